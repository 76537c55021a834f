"""The ``moeplan`` command line (typer). Thin wrappers: load specs, call the library, print.

Exit codes: 0 success, 2 bad input (a one-paragraph error naming field, value and rule), 3 no
feasible plan, 4 solver failure. A traceback means a bug in moeplan.
Machine output (``--json``) goes to stdout only; human tables to stdout, errors to stderr.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.panel import Panel

from planner import __version__
from planner.accuracy.calibrate import RUN_RECORD_FORMAT
from planner.catalog import (
    DEFAULT_CLUSTER,
    default_cluster,
    list_clusters,
    list_models,
    load_cluster,
    load_gpu,
    load_model,
    profile_yaml,
    with_nodes,
)
from planner.costmodel import BUNDLED_RUNTIME, count_params, estimate, with_framework
from planner.costmodel.dispatchers import dispatcher_names, spec_for
from planner.costmodel.routing import topology_aware_remote_fraction
from planner.errors import InfeasiblePlanError, MoeplanError, SpecError
from planner.feasibility import require_feasible
from planner.overrides import apply_what_if, parse_assignment
from planner.present.report import (
    layout_label,
    render_calibration,
    render_check_outcome,
    render_cluster,
    render_clusters,
    render_estimate,
    render_model,
    render_models,
    render_plan,
    render_probe,
    render_run,
    render_validation,
    render_what_if,
)
from planner.schema import (
    ClusterProfile,
    DispatcherSpec,
    GpuSpec,
    ModelSpec,
    ParallelConfig,
    Plan,
    TrainingSpec,
)
from planner.search import SearchOptions, solve
from planner.specfiles import atomic_write_text, validate_spec
from planner.units import GIB

__all__ = ["app", "main"]

app = typer.Typer(
    name="moeplan",
    help="Topology-aware planner for Mixture-of-Experts training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
show_app = typer.Typer(help="Show one model, cluster or GPU in full.", no_args_is_help=True)
app.add_typer(show_app, name="show")
testbed_app = typer.Typer(
    help="An emulated multi-node cluster on this host (network namespaces, root only).", no_args_is_help=True
)
app.add_typer(testbed_app, name="testbed")

out = Console()
err = Console(stderr=True)

P = ParamSpec("P")
R = TypeVar("R")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of a table.")]


def user_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn a MoeplanError into a one-paragraph message on stderr and its exit code (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except MoeplanError as exc:
            err.print(Panel(str(exc), title="moeplan: error", title_align="left", border_style="red"))
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def print_json(data: Any) -> None:
    """Canonical JSON on stdout: sorted keys, so identical inputs print identical bytes."""
    print(json.dumps(data, indent=2, sort_keys=True))


def _version_callback(value: bool) -> None:
    if value:
        print(f"moeplan {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Probe a cluster, solve for the best MoE parallel plan, run it."""


def _model_summary(model: ModelSpec) -> dict[str, Any]:
    counts = count_params(model)
    return {
        "name": model.name,
        "total_params": counts.total,
        "active_params": counts.active,
        "num_layers": model.num_layers,
        "hidden_size": model.hidden_size,
        "num_experts": model.num_experts,
        "moe_router_topk": model.moe_router_topk,
        "attention": model.attention,
    }


def _cluster_summary(cluster: ClusterProfile) -> dict[str, Any]:
    return {
        "name": cluster.name,
        "num_nodes": cluster.num_nodes,
        "num_gpus_per_node": cluster.num_gpus_per_node,
        "num_gpus": cluster.world_size,
        "gpu": cluster.gpu.name,
        "hbm_gib": cluster.gpu.hbm_gib,
        "description": cluster.description,
    }


@app.command()
@user_errors
def models(as_json: JsonFlag = False) -> None:
    """List the model catalog with total and active parameter counts."""
    catalog = list_models()
    if as_json:
        print_json([_model_summary(m) for m in catalog])
    else:
        out.print(render_models(catalog))


@app.command()
@user_errors
def clusters(as_json: JsonFlag = False) -> None:
    """List the bundled cluster profiles and their sizes."""
    profiles = list_clusters()
    if as_json:
        print_json([_cluster_summary(c) for c in profiles])
    else:
        out.print(render_clusters(profiles))


@show_app.command("model")
@user_errors
def show_model(
    name: Annotated[
        str, typer.Argument(help="Catalog name, a moeplan model YAML, or a Hugging Face config.json.")
    ],
    as_json: JsonFlag = False,
) -> None:
    """Show a model's fields, parameter counts and source."""
    model = load_model(name)
    if as_json:
        counts = count_params(model)
        print_json(
            {
                **_model_summary(model),
                "routed_expert_params": counts.routed_experts,
                "mtp_params": counts.mtp,
                "spec": model.model_dump(mode="json"),
            }
        )
    else:
        out.print(render_model(model))


@show_app.command("cluster")
@user_errors
def show_cluster(
    name: Annotated[str, typer.Argument(help="Bundled profile name or a cluster profile YAML.")],
    nodes: Annotated[int | None, typer.Option(help="Override the node count of a bundled profile.")] = None,
    topology: Annotated[
        bool, typer.Option("--topology", help="With --json, include the networkx graph.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Show a cluster profile: GPU, link classes with per-collective fits, provenance."""
    cluster = load_cluster(name, nodes)
    if as_json:
        data = cluster.model_dump(mode="json")
        if topology:
            # networkx is imported only here: it costs ~130 ms of start-up that other commands skip.
            from planner.topology import topology_node_link_data

            data["topology"] = topology_node_link_data(cluster)
        print_json(data)
    else:
        out.print(render_cluster(cluster))


@show_app.command("gpu")
@user_errors
def show_gpu(name: Annotated[str, typer.Argument(help="GPU name of the hardware catalog.")]) -> None:
    """Show a GPU's datasheet figures (JSON)."""
    print_json(load_gpu(name).model_dump(mode="json"))


DispatcherChoice = StrEnum("DispatcherChoice", {name.upper(): name for name in dispatcher_names()})  # type: ignore[misc]
"""The cost model's dispatcher names: its kinds and their kernel libraries (``spec_for``)."""


class RecomputeChoice(StrEnum):
    NONE = "none"
    SELECTIVE = "selective"
    FULL = "full"


class PrecisionChoice(StrEnum):
    BF16 = "bf16"
    FP8 = "fp8"
    MXFP8 = "mxfp8"


class RoutingChoice(StrEnum):
    BALANCED = "balanced"
    DROPLESS = "dropless"
    CAPACITY = "capacity"


def _given(**fields: Any) -> dict[str, Any]:
    """Only the options the user set: every default lives in the schema."""
    return {k: v.value if isinstance(v, StrEnum) else v for k, v in fields.items() if v is not None}


def _training(
    seq_len: int | None,
    gbs: int | None,
    precision: PrecisionChoice | None,
    routing: RoutingChoice | None,
    capacity_factor: float | None,
) -> TrainingSpec:
    """The TrainingSpec of the options the user set (the schema holds every default)."""
    fields = _given(
        seq_len=seq_len,
        global_batch=gbs,
        precision=precision,
        routing=routing,
        capacity_factor=capacity_factor,
    )
    return validate_spec(TrainingSpec, fields, "the training options")


def _dispatcher(choice: DispatcherChoice | None, chunks: int | None, **options: Any) -> DispatcherSpec:
    fields = _given(num_chunks=chunks, **options)
    if choice is not None:
        fields.update(spec_for(choice.value).model_dump(include={"kind", "backend"}))
    return validate_spec(DispatcherSpec, fields, "the dispatcher options")


Opt = typer.Option


# Options that solve and plot share, as the schema's defaults describe them.
DefaultClusterOpt = Annotated[
    str | None, Opt("--cluster", help="Profile name or file; default: the last probe, else a800-2x8.")
]
NodesOpt = Annotated[int | None, Opt("--nodes", help="Override the node count.")]
SeqLenOpt = Annotated[int | None, Opt("--seq-len", help="Sequence length (default 4096).")]
GbsOpt = Annotated[int | None, Opt("--gbs", help="Global batch size (default 1024).")]
PrecisionOpt = Annotated[PrecisionChoice | None, Opt("--precision", help="GEMM precision.")]


@app.command("estimate")
@user_errors
def estimate_command(
    model: Annotated[str, Opt(help="Catalog name, model YAML or Hugging Face config.json.")],
    cluster: Annotated[str, Opt(help="Bundled profile or profile YAML.")] = DEFAULT_CLUSTER,
    nodes: Annotated[int | None, Opt(help="Override the node count.")] = None,
    tp: Annotated[int | None, Opt(help="Tensor parallel degree.")] = None,
    pp: Annotated[int | None, Opt(help="Pipeline stages.")] = None,
    vpp: Annotated[int | None, Opt(help="Virtual stages per pipeline rank.")] = None,
    cp: Annotated[int | None, Opt(help="Context parallel degree.")] = None,
    ep: Annotated[int | None, Opt(help="Expert parallel degree.")] = None,
    etp: Annotated[int | None, Opt(help="Expert tensor parallel degree.")] = None,
    mbs: Annotated[int | None, Opt(help="Micro-batch size.")] = None,
    gbs: Annotated[int | None, Opt(help="Global batch size.")] = None,
    seq_len: Annotated[int | None, Opt(help="Sequence length.")] = None,
    recompute: Annotated[RecomputeChoice | None, Opt(help="Activation recompute granularity.")] = None,
    recompute_modules: Annotated[
        list[str] | None, Opt(help="Modules for selective recompute (repeat).")
    ] = None,
    dispatcher: Annotated[DispatcherChoice | None, Opt(help="Token dispatcher.")] = None,
    precision: Annotated[PrecisionChoice | None, Opt(help="GEMM precision.")] = None,
    no_sequence_parallel: Annotated[
        bool, Opt("--no-sequence-parallel", help="Turn off sequence parallelism.")
    ] = False,
    routing: Annotated[RoutingChoice | None, Opt(help="Routing mode.")] = None,
    capacity_factor: Annotated[float | None, Opt(help="Expert capacity factor (routing capacity).")] = None,
    a2a_chunks: Annotated[int | None, Opt(help="Chunks of the monta dispatcher's pipeline.")] = None,
    a2a_overlap: Annotated[bool, Opt("--a2a-overlap", help="Overlap EP communication with compute.")] = False,
    topology_aware_routing: Annotated[bool, Opt("--topology-aware-routing", help="TA-MoE dispatch.")] = False,
    condense: Annotated[float | None, Opt(help="Luffy token condensation: fraction rho of tokens.")] = None,
    sequence_migration: Annotated[
        bool, Opt("--sequence-migration", help="Luffy sequence migration.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Estimate step time, throughput, memory and traffic of one configuration."""
    spec = load_model(model)
    profile = load_cluster(cluster, nodes)
    training = _training(seq_len, gbs, precision, routing, capacity_factor)
    dispatch = _dispatcher(
        dispatcher,
        a2a_chunks,
        topology_aware_routing=topology_aware_routing or None,
        condense_fraction=condense,
        sequence_migration=sequence_migration or None,
    )
    degrees = _given(
        tp=tp, pp=pp, vpp=vpp, cp=cp, ep=ep, etp=etp, micro_batch=mbs, recompute=recompute,
        recompute_modules=recompute_modules,
        sequence_parallel=False if no_sequence_parallel else None, a2a_overlap=a2a_overlap or None,
    )  # fmt: skip
    try:
        parallel = ParallelConfig.for_world(profile.world_size, dispatcher=dispatch, **degrees)
    except ValueError as exc:  # pydantic's ValidationError: one of the degrees breaks a rule
        raise SpecError(f"the parallel options are invalid: {exc}") from None
    for warning in require_feasible(spec, training, parallel, profile.world_size, megatron=False):
        err.print(f"[yellow]warning:[/] {warning} (priced as DeepSpeed-MoE runs it)")
    result = estimate(spec, training, parallel, profile)
    if as_json:
        print_json(
            {
                "model": spec.name,
                "cluster": profile.name,
                "num_gpus": profile.world_size,
                "training": training.model_dump(mode="json"),
                "parallel": parallel.model_dump(mode="json"),
                "estimate": result.model_dump(mode="json"),
            }
        )
    else:
        title = f"{spec.name} on {profile.name} ({profile.world_size} GPUs), tp{parallel.tp} pp{parallel.pp} ep{parallel.ep}"
        out.print(render_estimate(result, title))


@app.command("validate")
@user_errors
def validate_command(
    path: Annotated[Path, typer.Argument(help="A file in the moeplan-validation/1 format.")],
    with_solve: Annotated[
        bool, Opt("--solve", help="Also solve each group and compare with its best measured configuration.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Compare the cost model with published measurements: error per case, ranking per group."""
    from planner.accuracy.validate import solve_groups, validate_suite
    from planner.accuracy.validation_file import load_validation_file

    suite = load_validation_file(path)
    report = validate_suite(suite)
    solutions = {s.group: s for s in solve_groups(suite, report)} if with_solve else {}
    if as_json:
        print_json(
            {
                "cases": [
                    {
                        "id": c.id,
                        "group": c.group,
                        "metric": c.metric,
                        "predicted": c.predicted,
                        "measured": c.measured,
                        "error": c.error,
                        "fits": c.fits,
                    }
                    for c in report.cases
                ],
                "groups": [_group_json(g.group, list(g.case_ids), g.kendall_tau, g.top1_match, solutions)
                           for g in report.groups]
                + [_group_json(name, [], None, None, solutions) for name in solutions
                   if name not in {g.group for g in report.groups}],
                "mape": report.mape,
            }
        )  # fmt: skip
    else:
        out.print(render_validation(report))
        for solution in solutions.values():
            p = solution.solver_plan
            out.print(
                f"{solution.group}: solver plan tp{p['tp']} pp{p['pp']} vpp{p['vpp']} ep{p['ep']} etp{p['etp']} "
                f"mbs{p['micro_batch']} {p['recompute']} -> {solution.solver_predicted:.3f} s predicted; best measured "
                f"configuration {solution.best_measured_predicted:.3f} s predicted"
                + ("" if solution.best_measured_fits else " (predicted not to fit)")
            )


def _group_json(
    group: str, cases: list[str], tau: float | None, top1: bool | None, solutions: dict[str, Any]
) -> dict[str, Any]:
    entry: dict[str, Any] = {"group": group, "cases": cases, "kendall_tau": tau, "top1_match": top1}
    if group in solutions:
        solution = solutions[group]
        entry |= {
            "solver_plan": solution.solver_plan,
            "solver_predicted": solution.solver_predicted,
            "best_measured_predicted": solution.best_measured_predicted,
            "best_measured_fits": solution.best_measured_fits,
        }
    return entry


class EmitFormat(StrEnum):
    PLAN_JSON = "plan-json"
    MEGATRON = "megatron"
    TORCHTITAN = "torchtitan"
    TORCHRUN = "torchrun"
    SLURM = "slurm"


def _emit(plan: Plan, fmt: EmitFormat, plan_path: str, megatron_version: str | None) -> str:
    """The plan in one launch format (the model and cluster are reloaded from the names the plan records)."""
    from planner.emit import (
        DEFAULT_MEGATRON_VERSION,
        emit_megatron,
        emit_plan_json,
        emit_slurm,
        emit_torchrun,
        emit_torchtitan,
    )

    if fmt is EmitFormat.PLAN_JSON:
        return emit_plan_json(plan)
    if fmt is EmitFormat.MEGATRON:
        return emit_megatron(plan, load_model(plan.model), megatron_version or DEFAULT_MEGATRON_VERSION)
    if fmt is EmitFormat.TORCHTITAN:
        return emit_torchtitan(plan, load_model(plan.model))
    per_node = (
        load_cluster(plan.cluster).num_gpus_per_node if Path(plan.cluster).suffix == "" else plan.num_gpus
    )
    per_node = min(per_node, plan.num_gpus)
    nnodes = plan.num_gpus // per_node
    if fmt is EmitFormat.TORCHRUN:
        return emit_torchrun(plan, plan_path=plan_path, nnodes=nnodes, nproc_per_node=per_node)
    return emit_slurm(plan, plan_path=plan_path, nnodes=nnodes, gpus_per_node=per_node)


@app.command("solve")
@user_errors
def solve_command(
    model: Annotated[str, Opt(help="Catalog name, model YAML or Hugging Face config.json.")],
    cluster: DefaultClusterOpt = None,
    nodes: NodesOpt = None,
    seq_len: SeqLenOpt = None,
    gbs: GbsOpt = None,
    precision: PrecisionOpt = None,
    routing: Annotated[RoutingChoice | None, Opt(help="Routing mode.")] = None,
    capacity_factor: Annotated[float | None, Opt(help="Expert capacity factor (routing capacity).")] = None,
    dispatchers: Annotated[
        list[DispatcherChoice] | None, Opt("--dispatcher", help="Dispatchers to consider (repeat).")
    ] = None,
    topology_aware_routing: Annotated[
        bool, Opt("--topology-aware-routing", help="Allow TA-MoE's topology-aware dispatch (alters routing).")
    ] = False,
    condense: Annotated[float | None, Opt(help="Luffy token condensation rho (alters numerics).")] = None,
    time_limit: Annotated[float, Opt(help="Solver time limit, seconds.")] = 60.0,
    gap: Annotated[float, Opt(help="Relative optimality gap of the ILP.")] = 1e-6,
    exhaustive: Annotated[
        bool, Opt("--exhaustive", help="Enumerate every stage assignment (small spaces).")
    ] = False,
    top_k: Annotated[int, Opt(help="Alternatives of other structures to show.")] = 5,
    output: Annotated[Path | None, Opt("-o", "--output", help="Write the plan document (JSON) here.")] = None,
    emit: Annotated[EmitFormat | None, Opt(help="Also print the plan in this launch format.")] = None,
    what_if: Annotated[
        list[str] | None,
        Opt(
            "--what-if",
            help="Also solve with a profile figure changed, FIELD=VALUE (repeat), e.g. inter_node_gbps=100, and "
            "show how the plan and its time move.",
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Find the provably best plan for a model on a cluster and show why it wins."""
    # Imported here: the solver brings PuLP (~0.2 s), which no other command needs.
    from planner.emit import emit_plan_json, write_plan

    spec = load_model(model)
    if cluster is None:
        profile, note = default_cluster(nodes)
        err.print(f"[dim]{note}[/]")
    else:
        profile = load_cluster(cluster, nodes)
    training = _training(seq_len, gbs, precision, routing, capacity_factor)
    choices: dict[str, Any] = {"topology_aware_routing": topology_aware_routing}
    if condense is not None:
        _dispatcher(
            None, None, condense_fraction=condense
        )  # the schema's rule on rho, as one error paragraph
        choices["condense_fraction"] = condense
    if dispatchers:
        choices["dispatchers"] = tuple(sorted({d.value for d in dispatchers}))
    options = SearchOptions(**choices)
    assignments = [parse_assignment(text) for text in what_if or []]
    changed_profile = apply_what_if(profile, assignments) if assignments else None  # bad input fails first
    result = solve(
        spec, training, profile, options, time_limit_s=time_limit, gap=gap, exhaustive=exhaustive, top_k=top_k
    )
    plan = result.plan.model_copy(update={"model": model, "cluster": cluster or profile.name})
    if output is not None:
        write_plan(output, plan)
    comparison = None
    if changed_profile is not None:
        comparison = _what_if(
            spec, training, changed_profile, options, plan, assignments, time_limit, gap, exhaustive
        )
    if as_json:
        if comparison is None:
            print(emit_plan_json(plan), end="")
        else:
            print_json({"plan": json.loads(emit_plan_json(plan)), "what_if": comparison})
    else:
        alternatives = [(a.parallel, a.estimate) for a in result.alternatives]
        out.print(render_plan(plan, alternatives, profile.gpu.hbm_gib * GIB))
        if comparison is not None:
            out.print(render_what_if(comparison))
    if emit is not None:
        out.print(_emit(plan, emit, str(output or "plan.json"), None), markup=False, highlight=False, end="")


def _what_if(
    spec: ModelSpec,
    training: TrainingSpec,
    profile: ClusterProfile,
    options: SearchOptions,
    plan: Plan,
    assignments: list[tuple[str, Any]],
    time_limit: float,
    gap: float,
    exhaustive: bool,
) -> dict[str, Any]:
    """The plan on the changed profile and how it differs from ``plan`` (JSON-ready)."""
    from planner.accuracy.golden import layout_changes
    from planner.emit import emit_plan_json

    said = dict(assignments)
    try:
        other = solve(
            spec, training, profile, options, time_limit_s=time_limit, gap=gap, exhaustive=exhaustive
        ).plan
    except InfeasiblePlanError as exc:
        return {
            "assignments": said,
            "plan": None,
            "infeasible": str(exc),
            "changes": [],
            "relative_change": None,
        }
    other = other.model_copy(update={"model": plan.model, "cluster": f"{plan.cluster} (what-if)"})
    assert plan.estimate is not None and other.estimate is not None
    return {
        "assignments": said,
        "plan": json.loads(emit_plan_json(other)),
        "infeasible": None,
        "changes": [
            {"field": c.field, "before": c.expected, "after": c.actual} for c in layout_changes(plan, other)
        ],
        "relative_change": other.estimate.step_time_s / plan.estimate.step_time_s - 1,
    }


@app.command("plot")
@user_errors
def plot_command(
    output: Annotated[
        Path, Opt("-o", "--output", help="Figure file: .png, .svg or .html (page with tables).")
    ],
    plan_file: Annotated[
        Path | None, Opt("--plan", help="Draw this plan document (moeplan solve -o).")
    ] = None,
    model: Annotated[str | None, Opt(help="Or solve this model and draw its top plans.")] = None,
    cluster: DefaultClusterOpt = None,
    nodes: NodesOpt = None,
    seq_len: SeqLenOpt = None,
    gbs: GbsOpt = None,
    precision: PrecisionOpt = None,
    top: Annotated[int, Opt(help="Plans to compare in the breakdown (the best first).")] = 3,
) -> None:
    """Draw the estimate breakdown of the top plans and a timeline of one step (PNG, SVG or HTML)."""
    from planner.present.plot import write_figure

    if (plan_file is None) == (model is None):
        raise SpecError(
            "moeplan plot needs exactly one of --plan (a plan document) and --model (solve, then draw)"
        )
    if top < 1:
        raise SpecError(f"--top ({top}) must be at least 1")
    if plan_file is not None:
        from planner.emit import load_plan

        plan = load_plan(plan_file)
        profile = load_cluster(plan.cluster, nodes)
        found = plan.estimate or estimate(load_model(plan.model), plan.training, plan.parallel, profile)
        entries = [(layout_label(plan.parallel), found)]
        title = f"{plan.model} on {plan.cluster} ({plan.num_gpus} GPUs)"
    else:
        assert model is not None
        spec = load_model(model)
        profile = load_cluster(cluster, nodes) if cluster else default_cluster(nodes)[0]
        training = _training(seq_len, gbs, precision, None, None)
        result = solve(spec, training, profile, SearchOptions(), top_k=max(top - 1, 1))
        assert result.plan.estimate is not None
        plans = [(result.plan.parallel, result.plan.estimate)]
        plans += [(a.parallel, a.estimate) for a in result.alternatives[: top - 1]]
        entries = [(f"{layout_label(p)} {p.dispatcher.kind}", found) for p, found in plans]
        title = f"{spec.name} on {profile.name} ({profile.world_size} GPUs), sequence {training.seq_len}"
    write_figure(output, entries, title)
    out.print(
        f"wrote {output}: {len(entries)} plan(s), best {entries[0][1].step_time_s:.4g} s per step",
        soft_wrap=True,
    )


@app.command("emit")
@user_errors
def emit_command(
    plan_file: Annotated[Path, Opt("--plan", help="A plan document written by moeplan solve -o.")],
    fmt: Annotated[EmitFormat, Opt("--format", help="Launch format.")],
    megatron_version: Annotated[str | None, Opt(help="Megatron-Core release to target (e.g. 0.16).")] = None,
) -> None:
    """Print a plan as Megatron-LM arguments, a torchtitan config, a torchrun command or a Slurm script."""
    from planner.emit import load_plan

    plan = load_plan(plan_file)
    print(_emit(plan, fmt, str(plan_file), megatron_version), end="")


@app.command("check")
@user_errors
def check_command(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(help="Case files (*.check.yaml) or folders holding them; default: examples/."),
    ] = None,
    update: Annotated[
        bool, Opt("--update", help="Rewrite the expected plans from today's solve (on purpose).")
    ] = False,
    junit_xml: Annotated[
        Path | None, Opt(help="Also write a JUnit XML report here (for CI systems).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Re-solve golden plan cases and fail (exit 1) with a readable diff when a plan or its time moved."""
    from planner.accuracy.golden import check_case, find_cases, load_case, write_junit

    case_files = find_cases(paths or [Path("examples")])
    cases = [(path, load_case(path)) for path in case_files]  # every file is read before any solve
    outcomes = []
    for path, case in cases:
        outcome = check_case(path, case, update=update)
        outcomes.append(outcome)
        if not as_json:
            out.print(render_check_outcome(outcome), highlight=False, soft_wrap=True)
    if junit_xml is not None:
        write_junit(junit_xml, outcomes)
    failed = sum(o.status == "regression" for o in outcomes)
    counts = {
        status: sum(o.status == status for o in outcomes) for status in ("pass", "regression", "updated")
    }
    if as_json:
        print_json({"cases": [o.to_json() for o in outcomes], "counts": counts, "ok": failed == 0})
    else:
        out.print(
            f"{len(outcomes)} cases: {counts['pass']} pass, {counts['regression']} regressed, "
            f"{counts['updated']} updated"
        )
    if failed:
        raise typer.Exit(1)


@app.command("calibrate")
@user_errors
def calibrate_command(
    runs: Annotated[Path, Opt(help="Folder of `moeplan run -o` records to fit to.")],
    cluster: Annotated[str, Opt(help="The profile of the cluster the runs ran on (name or file).")],
    output: Annotated[Path, Opt("-o", "--output", help="Write the calibrated profile (YAML) here.")],
    held_out: Annotated[
        Path | None, Opt(help="Folder of further records left out of the fit, to measure generalization.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Fit a profile's efficiencies to measured runs; report the error before and after, fit and held out."""
    from planner.accuracy.calibrate import calibrate, load_runs, mean_absolute_error, predict

    profile = load_cluster(cluster)
    fit_runs = load_runs(runs)
    other_runs = load_runs(held_out) if held_out is not None else []
    result = calibrate(profile, fit_runs)
    other_before = [predict(profile, run) for run in other_runs]
    other_after = [predict(result.profile, run) for run in other_runs]
    atomic_write_text(
        output,
        profile_yaml(
            result.profile,
            f"Calibrated by `moeplan calibrate --runs {runs} --cluster {cluster}` from {len(fit_runs)} run(s);",
            "each changed figure's source says how calibration changed it.",
        ),
    )
    rows = [
        {"run": str(run.path), "set": kind, "measured_s": run.measured_step_s, "predicted_before_s": before,
         "predicted_after_s": after, "error_before": before / run.measured_step_s - 1,
         "error_after": after / run.measured_step_s - 1}
        for kind, group, befores, afters in (
            ("fit", fit_runs, result.fit_before, result.fit_after), ("held-out", other_runs, other_before, other_after)
        )
        for run, before, after in zip(group, befores, afters, strict=True)
    ]  # fmt: skip

    def errors(group: list[Any], before: Sequence[float], after: Sequence[float]) -> dict[str, Any]:
        return {
            "runs": len(group),
            "mape_before": mean_absolute_error(before, group),
            "mape_after": mean_absolute_error(after, group),
        }

    summary = {
        "fit": errors(fit_runs, result.fit_before, result.fit_after),
        "held_out": errors(other_runs, other_before, other_after) if other_runs else None,
    }
    report = {
        "knobs": [{"name": n, "before": b, "after": a} for n, b, a in result.knobs],
        "runs": rows,
        "output": str(output),
        **summary,
    }
    if as_json:
        print_json(report)
    else:
        out.print(render_calibration(report))


class BackendChoice(StrEnum):
    AUTO = "auto"
    GLOO = "gloo"
    NCCL = "nccl"


@app.command("probe")
@user_errors
def probe_command(
    nproc: Annotated[int | None, Opt(help="Start N local ranks over loopback (not under torchrun).")] = None,
    backend: Annotated[
        BackendChoice, Opt(help="nccl on GPUs, gloo on CPUs; auto picks nccl when every rank has a GPU.")
    ] = BackendChoice.AUTO,
    testbed: Annotated[
        bool, Opt("--testbed", help="Run the ranks on the emulated cluster of `moeplan testbed up`.")
    ] = False,
    budget: Annotated[float, Opt(help="Seconds the whole probe may take, start-up included.")] = 60.0,
    output: Annotated[
        Path | None,
        Opt(
            "-o", "--output", help="Write the cluster profile (YAML) here; it is also kept as the last probe."
        ),
    ] = None,
    name: Annotated[str | None, Opt(help="Profile name (default probe-HOST-NODESxRANKS).")] = None,
    gpu: Annotated[
        str | None,
        Opt(
            help="Catalog GPU whose datasheet peaks the measured fractions refer to (default: by device name)."
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Discover the cluster's topology, time its collectives (nccl-tests conventions) and write a profile.

    Under torchrun it runs as one rank per process; `--nproc N` starts N local ranks; `--testbed` runs on
    the emulated cluster. The profile is what `moeplan solve --cluster FILE` reads.
    """
    import shlex
    import sys

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from planner.probe.build import nccl_tests_table, probe_summary
    from planner.workflows.probe import ProbeRequest, run_probe

    request = ProbeRequest(
        nproc=nproc,
        backend=backend.value,
        testbed=testbed,
        budget_s=budget,
        output=output,
        name=name,
        gpu=gpu,
        command=shlex.join(["moeplan", *sys.argv[1:]]),
    )
    with Progress(
        TextColumn("[bold]probe[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=err, transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task("starting ranks", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        outcome = run_probe(request, progress)
    if outcome is None:  # a rank other than 0 under torchrun
        return
    summary = probe_summary(outcome.results, outcome.profile)
    summary["written"] = [str(path) for path in outcome.written]
    if as_json:
        print_json(summary)
        return
    print(nccl_tests_table(outcome.results))
    out.print(render_probe(summary))
    for path in outcome.written:
        out.print(f"wrote {path}")


class RunDispatcherChoice(StrEnum):
    ALLTOALL = "alltoall"
    HIERARCHICAL = "hierarchical"
    MONTA = "monta"


def _topology_remote_share(
    parallel: ParallelConfig, ranks_per_node: int, cluster: str | None
) -> float | None:
    """TA-MoE's target share of off-node copies for a run: the cost model's balance of the profile's
    intra- and inter-node all-to-all bandwidths (``topology_aware_remote_fraction``)."""
    if not parallel.dispatcher.topology_aware_routing:
        return None
    profile = load_cluster(cluster) if cluster else default_cluster()[0]
    links = profile.links
    if "inter_node" not in links or "intra_node" not in links:
        raise SpecError(
            f"topology-aware routing needs intra_node and inter_node all-to-all bandwidths, and profile "
            f"'{profile.name}' lacks one: probe a cluster of two or more nodes, or pass --cluster"
        )
    share = topology_aware_remote_fraction(
        parallel.ep,
        min(parallel.ep, ranks_per_node),
        links["intra_node"].collectives["all_to_all"].bandwidth_gbps,
        links["inter_node"].collectives["all_to_all"].bandwidth_gbps,
    )
    return share if share > 0 else None


def _run_prediction(
    spec: ModelSpec, training: TrainingSpec, parallel: ParallelConfig, cluster: str | None, world: int
) -> tuple[dict[str, Any] | None, str]:
    """The cost model's estimate for the run's layout on a profile of the run's size, or why there is none."""
    try:
        profile = load_cluster(cluster) if cluster else default_cluster()[0]
        if profile.world_size != world:
            if profile.topology is not None or world % profile.num_gpus_per_node:
                return None, (
                    f"no prediction: profile '{profile.name}' has {profile.world_size} GPUs "
                    f"({profile.num_gpus_per_node} per node) and cannot be resized to the run's {world} ranks"
                )
            profile = with_nodes(profile, world // profile.num_gpus_per_node)
    except MoeplanError as exc:
        return None, f"no prediction: {exc}"
    # The run measures the bundled runtime, not Megatron-Core: price that framework's overheads.
    result = estimate(spec, training, parallel, with_framework(profile, BUNDLED_RUNTIME))
    return result.model_dump(mode="json"), f"predicted on profile '{profile.name}'"


def _run_as_rank(options: Any) -> Any:
    """This process as one rank of a torchrun job: rank 0's outcome, None on the other ranks."""
    from planner.runtime.run_options import unsupported
    from planner.runtime.train import run_rank  # torch: only the ranks themselves import it
    from planner.workflows.run import RunOutcome

    reason = unsupported(options)
    if reason:
        raise SpecError(reason)
    results = run_rank(options)
    return None if results is None else RunOutcome(results, None)


@app.command("run")
@user_errors
def run_command(
    plan_file: Annotated[
        Path | None, Opt("--plan", help="A plan document (moeplan solve -o); flags override it.")
    ] = None,
    model: Annotated[
        str | None, Opt(help="Model to train instead of the plan's (e.g. tiny-moe on CPU).")
    ] = None,
    nproc: Annotated[int | None, Opt(help="Start N local ranks over loopback.")] = None,
    testbed: Annotated[bool, Opt("--testbed", help="Run the ranks on the emulated cluster.")] = False,
    ranks_per_node: Annotated[
        int | None,
        Opt(help="Local runs: treat every R consecutive ranks as one node (dispatch and byte counts)."),
    ] = None,
    tp: Annotated[int | None, Opt(help="Tensor parallel degree (attention and dense FFNs split).")] = None,
    sequence_parallel: Annotated[
        bool | None,
        Opt(
            "--sequence-parallel/--no-sequence-parallel",
            help="Split the residual stream over TP along the sequence (Megatron SP); default: the plan's.",
        ),
    ] = None,
    pp: Annotated[
        int | None, Opt(help="Pipeline stages (torch.distributed.pipelining 1F1B; interleaved with --vpp).")
    ] = None,
    vpp: Annotated[int | None, Opt(help="Virtual pipeline stages per rank (interleaved 1F1B).")] = None,
    ep: Annotated[int | None, Opt(help="Expert parallel degree.")] = None,
    etp: Annotated[int | None, Opt(help="Expert tensor parallel degree (each expert's FFN split).")] = None,
    cp: Annotated[
        int | None, Opt(help="Context parallel degree (key/value all-gather over the CP group).")
    ] = None,
    mbs: Annotated[int | None, Opt(help="Micro-batch size.")] = None,
    dispatcher: Annotated[
        RunDispatcherChoice | None, Opt(help="Token dispatcher (overrides the plan's).")
    ] = None,
    a2a_chunks: Annotated[int | None, Opt(help="Chunks of the monta dispatcher's pipeline.")] = None,
    condense_threshold: Annotated[
        float | None,
        Opt(help="Luffy condensation: cosine similarity above which a token reuses another's result."),
    ] = None,
    topology_aware_routing: Annotated[
        bool | None,
        Opt(
            "--topology-aware-routing/--no-topology-aware-routing",
            help="TA-MoE's topology-aware loss (target from --cluster's bandwidths); default: the plan's.",
        ),
    ] = None,
    sequence_migration: Annotated[
        bool | None,
        Opt(
            "--sequence-migration/--no-sequence-migration",
            help="Luffy sequence migration (alltoall dispatcher, tp/cp/pp/etp 1); default: the plan's.",
        ),
    ] = None,
    steps: Annotated[int, Opt(help="Optimizer steps.")] = 20,
    seed: Annotated[int, Opt(help="Seed of the weights and the synthetic data.")] = 0,
    seq_len: Annotated[
        int | None, Opt(help="Sequence length (default: the plan's when running its model, else 64).")
    ] = None,
    gbs: Annotated[
        int | None,
        Opt(
            help="Global batch (default: the plan's when running its model, else 2 micro-batches per DP rank)."
        ),
    ] = None,
    cluster: Annotated[
        str | None, Opt(help="Profile for the prediction (default: the last probe, else a800-2x8).")
    ] = None,
    checkpoint_dir: Annotated[
        Path | None, Opt(help="Write checkpoints here (torch.distributed.checkpoint, atomic).")
    ] = None,
    checkpoint_every: Annotated[
        int, Opt(help="Steps between checkpoints (the last step is always saved).")
    ] = 10,
    resume: Annotated[
        bool, Opt("--resume", help="Continue from the newest checkpoint in --checkpoint-dir.")
    ] = False,
    timeout: Annotated[
        float, Opt(help="Collective timeout, seconds: a dead rank fails the job after this long.")
    ] = 60.0,
    output: Annotated[
        Path | None,
        Opt("-o", "--output", help="Write the run record (JSON) here, e.g. for moeplan calibrate."),
    ] = None,
    backend: Annotated[
        BackendChoice, Opt(help="auto: NCCL when every local rank has a GPU, else gloo.")
    ] = BackendChoice.AUTO,
    as_json: JsonFlag = False,
) -> None:
    """Train a plan's layout with the bundled torch.distributed runtime and compare it with the prediction."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from planner.execution.devices import choose_backend
    from planner.execution.launcher import under_torchrun
    from planner.runtime.run_options import RunOptions
    from planner.workflows.run import launch_run, placement_for

    plan = None
    if plan_file is not None:
        from planner.emit import load_plan

        plan = load_plan(plan_file)
    model_name = model or (plan.model if plan else None)
    if model_name is None:
        raise SpecError("moeplan run needs --model, or --plan with a model")
    spec = load_model(model_name)
    # Under torchrun (the emitted torchrun command, Slurm) this process is one rank of the job; otherwise
    # moeplan starts the ranks: without --nproc, a plan's own GPU count sets them (the testbed its own).
    as_rank = under_torchrun() and not testbed and nproc is None
    placement = None
    if as_rank:
        world = int(os.environ["WORLD_SIZE"])
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    else:
        ranks = nproc if nproc is not None or testbed or plan is None else plan.num_gpus
        placement = placement_for(ranks, testbed, ranks_per_node)
        world, per_node = len(placement.prefixes), placement.ranks_per_node
    base = plan.parallel.model_dump() if plan else {}
    own_model = plan is not None and not (model and model != plan.model)
    taken: tuple[str, ...] = ("tp", "pp", "vpp", "cp", "ep", "etp", "micro_batch", "dispatcher")
    # The plan's uneven stage split belongs to its model and its pipeline: kept only for both.
    taken += ("layers_per_stage",) if own_model and pp is None and vpp is None else ()
    degrees = {k: v for k, v in base.items() if k in taken}
    degrees.update(_given(tp=tp, pp=pp, vpp=vpp, cp=cp, ep=ep, etp=etp, micro_batch=mbs))
    dispatch = dict(degrees.pop("dispatcher", {}) or {})
    dispatch.update(
        _given(
            kind=dispatcher, num_chunks=a2a_chunks, sequence_migration=sequence_migration,
            topology_aware_routing=topology_aware_routing,
        )
    )  # fmt: skip
    try:
        # A plan's sequence parallelism carries over, except to monta, which exists to remove the TP
        # duplicates that sequence parallelism does not make.
        planned_sp = plan is not None and plan.parallel.sequence_parallel and dispatch.get("kind") != "monta"
        # The runtime all-reduces gradients (no distributed optimizer): the prediction prices what it does.
        parallel = ParallelConfig.for_world(
            world,
            dispatcher=DispatcherSpec(**dispatch),
            sequence_parallel=planned_sp if sequence_parallel is None else sequence_parallel,
            distributed_optimizer=False,
            **degrees,
        )
    except ValueError as exc:
        raise SpecError(f"the run's layout is invalid on {world} ranks: {exc}") from None
    # Running a plan's own model means running the plan: its training settings are the defaults. Another
    # model (tiny-moe on CPU) runs the plan's layout at CPU-sized defaults.
    planned = plan.training if plan is not None and not (model and model != plan.model) else None
    seq_len = seq_len or (planned.seq_len if planned else 64)
    # Without a plan's batch: two micro-batches per DP rank, or one per pipeline stage to fill the pipeline.
    global_batch = gbs or (
        planned.global_batch if planned else parallel.dp * parallel.micro_batch * max(2, parallel.pp)
    )
    fields = {
        "model": spec, "model_name": model_name, "parallel": parallel, "steps": steps, "seed": seed,
        "backend": choose_backend(backend.value, per_node),
        "seq_len": seq_len, "global_batch": global_batch, "ranks_per_node": per_node,
        "condense_threshold": condense_threshold, "started": time.time(), "timeout_s": timeout,
        "topology_remote_share": _topology_remote_share(parallel, per_node, cluster),
        "checkpoint_dir": str(checkpoint_dir.resolve()) if checkpoint_dir else None,
        "checkpoint_every": checkpoint_every, "resume": resume,
    }  # fmt: skip
    options = validate_spec(RunOptions, fields, "the run options")
    if resume and checkpoint_dir is None:
        raise SpecError("--resume needs --checkpoint-dir (where the checkpoints are)")
    if placement is None:
        outcome = _run_as_rank(options)
        if outcome is None:  # not rank 0: rank 0 reports for the job
            return
    else:
        with Progress(
            TextColumn("[bold]run[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.description}"), console=err, transient=True,
        ) as bar:  # fmt: skip
            task = bar.add_task("starting ranks", total=None)
            outcome = launch_run(
                options, placement, lambda d, t, w: bar.update(task, completed=d, total=t, description=w)
            )
    results = outcome.results
    training = TrainingSpec(seq_len=seq_len, global_batch=global_batch)
    predicted, prediction_note = _run_prediction(spec, training, parallel, cluster, world)
    report: dict[str, Any] = results.model_dump(mode="json")
    report.update(
        format=RUN_RECORD_FORMAT,
        model=model_name,
        training=training.model_dump(mode="json"),
        ranks_per_node=per_node,
        cluster=cluster,
        model_overridden=bool(plan and model and model != plan.model),
        predicted=predicted,
        prediction_note=prediction_note,
        interface_tx_bytes=outcome.interface_tx_bytes,
    )
    if output is not None:
        atomic_write_text(output, json.dumps(report, indent=2, sort_keys=True) + "\n")
    if as_json:
        print_json(report)
        return
    out.print(render_run(report))


def _testbed_summary(bed: Any) -> dict[str, Any]:
    return {
        "nodes": bed.nodes,
        "ranks_per_node": bed.ranks_per_node,
        "inter_node_mbit": bed.inter_node_mbit,
        "inter_node_gbps": bed.inter_node_gbps,
        "inter_node_delay_ms": bed.inter_node_delay_ms,
        "namespaces": bed.namespaces,
        "addresses": bed.addresses,
        "interface": bed.interface,
        "created": bed.created,
    }


def _print_testbed(bed: Any, as_json: bool) -> None:
    if as_json:
        print_json(_testbed_summary(bed))
        return
    out.print(
        f"testbed: {bed.nodes} nodes x {bed.ranks_per_node} ranks, inter-node {bed.inter_node_mbit:g} Mbit/s "
        f"({bed.inter_node_gbps:.6g} GB/s) per node link and direction, delay {bed.inter_node_delay_ms:g} ms"
    )
    for node in range(bed.nodes):
        out.print(f"  node {node}: namespace {bed.namespace(node)}, {bed.interface} {bed.address(node)}")


@testbed_app.command("up")
@user_errors
def testbed_up(
    nodes: Annotated[int, Opt(help="Nodes (network namespaces).")] = 2,
    ranks_per_node: Annotated[int, Opt(help="Ranks each node runs (they share its link).")] = 2,
    inter_node_mbit: Annotated[float, Opt(help="Each node's link rate per direction, Mbit/s.")] = 200.0,
    inter_node_delay_ms: Annotated[
        float, Opt(help="One-way node-to-node delay, ms (needs the kernel's netem qdisc).")
    ] = 0.0,
    as_json: JsonFlag = False,
) -> None:
    """Create the emulated cluster: namespaces as nodes, veth links through a bridge, tc rate limits."""
    from planner.execution.testbed import up

    _print_testbed(up(nodes, ranks_per_node, inter_node_mbit, inter_node_delay_ms), as_json)


@testbed_app.command("down")
@user_errors
def testbed_down(as_json: JsonFlag = False) -> None:
    """Remove everything the testbed created (also after a crash)."""
    from planner.execution.testbed import down

    removed = down()
    if as_json:
        print_json({"removed": removed})
    else:
        out.print(f"removed {', '.join(removed)}" if removed else "nothing to remove")


@testbed_app.command("status")
@user_errors
def testbed_status(as_json: JsonFlag = False) -> None:
    """Show the running testbed, if any."""
    from planner.execution.testbed import status

    bed = status()
    if bed is None:
        if as_json:
            print_json(None)
        else:
            out.print("no testbed is up")
        return
    _print_testbed(bed, as_json)


class SchemaName(StrEnum):
    ALL = "all"
    MODEL = "model"
    GPU = "gpu"
    CLUSTER = "cluster"
    TRAINING = "training"
    PLAN = "plan"


_SCHEMAS: dict[SchemaName, type[BaseModel]] = {
    SchemaName.MODEL: ModelSpec,
    SchemaName.GPU: GpuSpec,
    SchemaName.CLUSTER: ClusterProfile,
    SchemaName.TRAINING: TrainingSpec,
    SchemaName.PLAN: Plan,
}


@app.command()
@user_errors
def schema(which: Annotated[SchemaName, typer.Argument(help="Which document.")] = SchemaName.ALL) -> None:
    """Print the JSON Schema of the input files and of the plan (field docs included)."""
    if which is SchemaName.ALL:
        print_json({name.value: spec.model_json_schema() for name, spec in _SCHEMAS.items()})
    else:
        print_json(_SCHEMAS[which].model_json_schema())


def main() -> None:
    """Console-script entry point."""
    app()
