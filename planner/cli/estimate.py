"""``moeplan estimate``: one layout priced, from flags or from a plan file (``--plan``, with ``--set``)."""

from pathlib import Path
from typing import Annotated

from planner.catalog import DEFAULT_CLUSTER
from planner.cli.app import JsonFlag, app, out, print_json, user_errors, warn
from planner.cli.options import (
    DispatcherChoice,
    Opt,
    PrecisionChoice,
    RecomputeChoice,
    RoutingChoice,
    SetOpt,
    set_assignments,
)
from planner.errors import SpecError
from planner.present.report import render_estimate
from planner.units import GIB
from planner.workflows.estimate import estimate_layout, estimate_plan
from planner.workflows.layouts import shorthand_assignments

__all__: list[str] = []


def split_option(text: str | None) -> tuple[int, ...] | None:
    """``--layers-per-stage 5,4,4,3`` as layer counts (the schema checks them against the layout)."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(","))
    except ValueError:
        raise SpecError(
            f"--layers-per-stage '{text}': give the decoder layers of each pipeline chunk as whole numbers "
            "separated by commas, e.g. 5,4,4,3"
        ) from None


@app.command("estimate")
@user_errors
def estimate_command(
    model: Annotated[
        str | None,
        Opt(
            help="Catalog name, model YAML or Hugging Face config.json (with --plan: instead of the plan's)."
        ),
    ] = None,
    plan_file: Annotated[
        Path | None,
        Opt("--plan", help="Re-price this plan document (its uneven stages too); flags change it."),
    ] = None,
    cluster: Annotated[
        str | None,
        Opt(help=f"Bundled profile or profile YAML (default {DEFAULT_CLUSTER}; with --plan, the plan's)."),
    ] = None,
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
    layers_per_stage: Annotated[
        str | None,
        Opt(
            help="Decoder layers of each (virtual) pipeline stage in order, comma-separated (e.g. 5,4,4,3): "
            "an uneven split, pp x vpp entries summing to the model's layers."
        ),
    ] = None,
    set_fields: SetOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Estimate step time, throughput, memory and traffic of one configuration (or of a plan, --plan)."""
    assignments = shorthand_assignments(
        tp=tp, pp=pp, vpp=vpp, cp=cp, ep=ep, etp=etp, mbs=mbs, recompute=recompute,
        recompute_modules=recompute_modules, dispatcher=dispatcher, a2a_chunks=a2a_chunks,
        sequence_parallel=False if no_sequence_parallel else None, a2a_overlap=a2a_overlap or None,
        topology_aware_routing=topology_aware_routing or None, condense=condense,
        sequence_migration=sequence_migration or None, seq_len=seq_len, gbs=gbs, precision=precision,
        routing=routing, capacity_factor=capacity_factor, layers_per_stage=split_option(layers_per_stage),
    ) + set_assignments(set_fields)  # fmt: skip
    if plan_file is not None:
        if nodes is not None:
            raise SpecError("--nodes does not apply with --plan: the plan records its node count")
        outcome = estimate_plan(plan_file, assignments, model, cluster)
    elif model is None:
        raise SpecError("moeplan estimate needs --model (and layout flags), or --plan with a plan document")
    else:
        outcome = estimate_layout(model, cluster or DEFAULT_CLUSTER, nodes, assignments)
    for message in (*outcome.warnings, *outcome.notes):
        warn(message)
    if as_json:
        print_json(
            {
                "model": outcome.model_name,
                "cluster": outcome.profile.name,
                "num_gpus": outcome.profile.world_size,
                "training": outcome.training.model_dump(mode="json"),
                "parallel": outcome.parallel.model_dump(mode="json"),
                "estimate": outcome.estimate.model_dump(mode="json"),
            }
        )
    else:
        p = outcome.parallel
        title = f"{outcome.model_name} on {outcome.profile.name} ({outcome.profile.world_size} GPUs), tp{p.tp} pp{p.pp} ep{p.ep}"
        out.print(render_estimate(outcome.estimate, title, outcome.profile.gpu.hbm_gib * GIB))
