"""``moeplan solve``: the provably best plan, why it wins, and (``--what-if``) how it moves."""

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import ValidationError

from planner.cli.app import JsonFlag, app, err, out, print_json, user_errors
from planner.cli.options import (
    DefaultClusterOpt,
    DispatcherChoice,
    EmitFormat,
    FrameworkChoice,
    GbsOpt,
    NodesOpt,
    Opt,
    PrecisionOpt,
    RecomputeChoice,
    RoutingChoice,
    SeqLenOpt,
    StateDtypeChoice,
)
from planner.cli.progress import progress_bar
from planner.errors import SpecError
from planner.frameworks import framework as framework_named
from planner.overrides import parse_assignment
from planner.present.report import render_plan, render_what_if
from planner.schema import CUDA_GRAPH_SCOPES, DEFAULT_MEMORY_MARGIN, OptimizerConfig, check_memory_margin
from planner.specfiles import check_writable
from planner.units import GIB
from planner.workflows.layouts import layout_from, shorthand_assignments
from planner.workflows.solve import SolveRequest, solve_plan

if TYPE_CHECKING:
    from planner.search import SolveProgress

__all__: list[str] = []

PROGRESS_AFTER_S = 2.0
"""A solve shows its progress once it has taken this long (most answer sooner)."""


def describe_solve(progress: "SolveProgress") -> tuple[int, int, str]:
    """A search's report as ``(done, total, what)`` for the progress line: layouts solved, known at the end."""
    if progress.priced == 0:
        return 0, 0, f"sizing and pricing {progress.layouts:,} layouts"
    best = "none yet" if progress.best_step_time_s is None else f"{progress.best_step_time_s:.4g} s"
    what = f"{progress.layouts:,} layouts: {progress.priced:,} fit, {progress.solved:,} solved, best {best}"
    if progress.done:
        return progress.solved, progress.solved, f"done, {what}"
    return progress.solved, 0, what


def check_margin_option(text: str) -> str:
    """``--memory-margin`` as given, or the input error naming the rule (exit 2)."""
    try:
        return check_memory_margin(text)
    except ValueError as error:
        raise SpecError(f"--memory-margin: {error}.") from None


def _refuse_offers(name: str, **offered: bool) -> None:
    """An offer the target framework cannot run is refused (exit 2), not left out of the search unsaid."""
    target = framework_named(name)
    for field, asked in offered.items():
        if asked and not getattr(target, field):
            flag = "--" + field.replace("_", "-")
            raise SpecError(
                f"{flag} has no {target.label} equivalent, so --framework {name} cannot run what it offers: "
                f"drop {flag}, or solve for --framework megatron."
            )


def graph_scopes_option(text: str) -> tuple[str, ...]:
    """``--cuda-graphs``: ``auto``, or comma-separated scopes each moeplan prices (exit 2 otherwise)."""
    scopes = tuple(part.strip() for part in text.split(",") if part.strip())
    if scopes == ("auto",):
        return scopes
    unknown = [scope for scope in scopes if scope not in CUDA_GRAPH_SCOPES]
    if not scopes or unknown:
        raise SpecError(
            f"--cuda-graphs ({text}) must be auto or comma-separated CUDA graph scopes of "
            f"{', '.join(CUDA_GRAPH_SCOPES)} (Megatron-Core's --cuda-graph-scope names moeplan prices)."
        )
    return scopes


def optimizer_options(
    main_grads_dtype: StateDtypeChoice | None, exp_avg_dtype: StateDtypeChoice | None, offload: str
) -> tuple[OptimizerConfig, bool]:
    """The model-state settings every layout starts from, and whether the search may add the
    numerics-preserving ones (``space.optimizer_ladder``); an input error names the flag (exit 2)."""
    fields: dict[str, object] = {}
    if main_grads_dtype is not None:
        fields["main_grads_dtype"] = main_grads_dtype.value
    if exp_avg_dtype is not None and exp_avg_dtype.value != "fp32":
        fields |= {"exp_avg_dtype": exp_avg_dtype.value, "precision_aware": True}
    relief = offload == "auto"
    if offload not in ("auto", "none"):
        try:
            fraction = float(offload)
        except ValueError:
            fraction = -1.0
        if not 0 < fraction <= 1:
            raise SpecError(
                f"--optimizer-offload ({offload}) must be auto (the search offloads what does not fit), none, "
                "or the share of the optimizer state to hold on the host, above 0 and at most 1."
            )
        fields |= {"offload_fraction": fraction, "precision_aware": True, "overlap_offload": True}
    try:
        return OptimizerConfig(**fields), relief
    except ValidationError as error:
        rule = str(error.errors()[0]["msg"]).removeprefix("Value error, ")
        given = " ".join(
            f"--{flag} {value}"
            for flag, value in (("main-grads-dtype", main_grads_dtype), ("exp-avg-dtype", exp_avg_dtype),
                                ("optimizer-offload", offload))
            if value is not None and value != "auto"
        )  # fmt: skip
        raise SpecError(f"{given}: {rule}.") from None


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
        list[DispatcherChoice] | None,
        Opt(
            "--dispatcher",
            help="Dispatchers the plan must use (repeat: one of them); deepep/hybridep: the hierarchical kind on "
            "that library. Unset: alltoall or hierarchical, whichever is faster.",
        ),
    ] = None,
    topology_aware_routing: Annotated[
        bool, Opt("--topology-aware-routing", help="Offer TA-MoE's topology-aware dispatch (alters routing).")
    ] = False,
    condense: Annotated[
        float | None, Opt(help="Offer Luffy token condensation at this rho (alters numerics).")
    ] = None,
    sequence_migration: Annotated[
        bool, Opt("--sequence-migration", help="Offer Luffy's sequence migration (moves attention work).")
    ] = False,
    framework: Annotated[
        FrameworkChoice,
        Opt(help="The framework that launches the plan: only what it can express is searched."),
    ] = FrameworkChoice.MEGATRON,
    tp: Annotated[int | None, Opt(min=1, help="Hold tensor parallelism at this degree.")] = None,
    pp: Annotated[int | None, Opt(min=1, help="Hold the pipeline stages at this count.")] = None,
    vpp: Annotated[int | None, Opt(min=1, help="Hold the virtual stages per pipeline rank.")] = None,
    cp: Annotated[int | None, Opt(min=1, help="Hold context parallelism at this degree.")] = None,
    ep: Annotated[int | None, Opt(min=1, help="Hold expert parallelism at this degree.")] = None,
    etp: Annotated[int | None, Opt(min=1, help="Hold expert tensor parallelism at this degree.")] = None,
    mbs: Annotated[int | None, Opt(min=1, help="Hold the micro-batch size.")] = None,
    max_tp: Annotated[int | None, Opt(min=1, help="Search tensor parallelism up to this degree.")] = None,
    max_pp: Annotated[int | None, Opt(min=1, help="Search pipelines up to this many stages.")] = None,
    max_vpp: Annotated[int | None, Opt(min=1, help="Search up to this many virtual stages.")] = None,
    max_cp: Annotated[int | None, Opt(min=1, help="Search context parallelism up to this degree.")] = None,
    max_ep: Annotated[int | None, Opt(min=1, help="Search expert parallelism up to this degree.")] = None,
    max_etp: Annotated[
        int | None, Opt(min=1, help="Search expert tensor parallelism up to this degree.")
    ] = None,
    max_mbs: Annotated[int | None, Opt(min=1, help="Search micro-batches up to this size.")] = None,
    recompute: Annotated[
        RecomputeChoice | None, Opt(help="Hold the recompute granularity (default: the search chooses).")
    ] = None,
    memory_margin: Annotated[
        str,
        Opt(
            help="Memory every GPU keeps free beyond the model's peak: 5%, 0.05 or 4GiB "
            "(default 5% of HBM; 0 packs to the limit)."
        ),
    ] = DEFAULT_MEMORY_MARGIN,
    main_grads_dtype: Annotated[
        StateDtypeChoice | None,
        Opt(help="Gradient buffer dtype (default fp32, Megatron-LM's; bf16 changes the numerics)."),
    ] = None,
    exp_avg_dtype: Annotated[
        StateDtypeChoice | None,
        Opt(
            help="Adam's moments (default fp32; bf16 changes the numerics, needs the precision-aware optimizer)."
        ),
    ] = None,
    optimizer_offload: Annotated[
        str,
        Opt(
            help="Optimizer CPU offload: auto (layouts that do not fit try the precision-aware optimizer, then "
            "offload), none, or a share 0-1 every layout holds on the host."
        ),
    ] = "auto",
    fp8_param_gather: Annotated[
        bool,
        Opt(
            "--fp8-param-gather/--no-fp8-param-gather",
            help="Under --precision fp8, keep and gather the GEMM weights in FP8 (Megatron-LM's "
            "--fp8-param-gather: half the parameter all-gather's bytes, the same memory).",
        ),
    ] = True,
    cuda_graphs: Annotated[
        str | None,
        Opt(
            "--cuda-graphs",
            help="Offer CUDA graphs: 'auto' (Transformer Engine's per-layer graphs of attention, dense FFNs "
            "and the MoE router and preprocessing) or Megatron scopes, e.g. attn,moe_router,moe_preprocess. "
            "Each layout is also priced with them (host launches saved, static buffers held); the plan keeps "
            "them where faster.",
        ),
    ] = None,
    tp_comm_overlap: Annotated[
        bool,
        Opt(
            "--tp-comm-overlap",
            help="Offer Megatron's --tp-comm-overlap (Transformer Engine overlaps the sequence-parallel "
            "all-gathers and reduce-scatters with the GEMMs): each layout with TP is also priced with it "
            "(collectives hidden, 16 SMs and userbuffers taken); the plan keeps it where faster.",
        ),
    ] = False,
    time_limit: Annotated[float, Opt(help="Solver time limit, seconds.")] = 60.0,
    gap: Annotated[float, Opt(help="Relative optimality gap of the ILP.")] = 1e-6,
    exhaustive: Annotated[
        bool, Opt("--exhaustive", help="Enumerate every stage assignment (small spaces).")
    ] = False,
    top_k: Annotated[int, Opt(help="Alternatives of other structures to show.")] = 5,
    output: Annotated[Path | None, Opt("-o", "--output", help="Write the plan document (JSON) here.")] = None,
    emit: Annotated[
        EmitFormat | None,
        Opt(
            help="Print the plan in this launch format on stdout, exactly as moeplan emit does (the report goes "
            "to stderr): moeplan solve ... --emit megatron > launch.sh."
        ),
    ] = None,
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
    from planner.emit import emit_plan_json, write_plan  # the solver's imports stay out of other commands
    from planner.search import SearchOptions
    from planner.search.space import recompute_choices
    from planner.workflows.emit import emit_plan

    if output is not None:
        check_writable(output)  # before the search, which may take minutes, not after it
    if as_json and emit is not None:
        raise SpecError(
            f"--json and --emit {emit.value} both print on stdout: choose one (write the plan with -o to keep it)."
        )
    # The training flags, and the condensation fraction, are checked by the schema's rules first.
    given = shorthand_assignments(seq_len=seq_len, gbs=gbs, precision=precision, routing=routing,
                                  capacity_factor=capacity_factor, condense=condense)  # fmt: skip
    training, _ = layout_from(given, 1)
    choices: dict[str, object] = {
        "topology_aware_routing": topology_aware_routing,
        "sequence_migration": sequence_migration,
        "framework": framework.value,
        "fp8_param_gather": fp8_param_gather,
        "tp_comm_overlap": tp_comm_overlap,
    }
    if condense is not None:
        choices["condense_fraction"] = condense
    if cuda_graphs is not None:
        choices["cuda_graphs"] = graph_scopes_option(cuda_graphs)
    _refuse_offers(framework.value, cuda_graphs=cuda_graphs is not None, tp_comm_overlap=tp_comm_overlap)
    held = {"tp": tp, "pp": pp, "vpp": vpp, "cp": cp, "ep": ep, "etp": etp, "micro_batch": mbs}
    bounds = {"tp": max_tp, "pp": max_pp, "vpp": max_vpp, "cp": max_cp, "ep": max_ep, "etp": max_etp,
              "micro_batch": max_mbs}  # fmt: skip
    choices["fixed"] = tuple((k, v) for k, v in held.items() if v is not None)
    choices["maxima"] = tuple((k, v) for k, v in bounds.items() if v is not None)
    choices["recompute"] = recompute_choices(recompute.value if recompute else None)
    choices["memory_margin"] = check_margin_option(memory_margin)
    choices["optimizer"], choices["memory_relief"] = optimizer_options(
        main_grads_dtype, exp_avg_dtype, optimizer_offload
    )
    if dispatchers:
        choices["dispatchers"] = tuple(sorted({d.value for d in dispatchers}))
        choices["dispatchers_named"] = True
    with progress_bar("solve", delay_s=PROGRESS_AFTER_S) as show:
        request = SolveRequest(
            model=model, cluster=cluster, nodes=nodes, training=training, options=SearchOptions(**choices),  # type: ignore[arg-type]
            time_limit_s=time_limit, gap=gap, exhaustive=exhaustive, top_k=top_k,
            what_if=tuple(parse_assignment(text) for text in what_if or []),
            progress=lambda progress: show(*describe_solve(progress)),
        )  # fmt: skip
        outcome = solve_plan(request)
    if outcome.note:
        err.print(f"[dim]{outcome.note}[/]")
    plan = outcome.plan
    if output is not None:
        write_plan(output, plan)
    if as_json:
        if outcome.what_if is None:
            print(emit_plan_json(plan), end="")
        else:
            print_json({"plan": json.loads(emit_plan_json(plan)), "what_if": outcome.what_if})
    else:
        # With --emit, stdout is the launch text alone (a script: `... --emit megatron | bash -n`), and the
        # report a person reads goes to stderr.
        report = err if emit is not None else out
        alternatives = [(a.parallel, a.estimate) for a in outcome.alternatives]
        report.print(render_plan(plan, alternatives, outcome.profile.gpu.hbm_gib * GIB))
        if outcome.offers:
            report.print(outcome.offers, highlight=False)
        if outcome.what_if is not None:
            report.print(render_what_if(outcome.what_if))
    if emit is not None:
        from planner.catalog import load_model

        text = emit_plan(emit.value, plan, str(output or "plan.json"), lambda: load_model(model))
        # As ``moeplan emit`` prints it: no terminal width applies (rich would wrap a long argument or
        # comment, and bash would run the wrapped half of a comment).
        out.file.flush()
        print(text, end="")
