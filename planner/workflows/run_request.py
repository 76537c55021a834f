"""``moeplan run``'s request: a plan (or the schema's defaults) plus the user's changes, turned into what
every rank runs (``RunOptions``), with each plan setting the bundled runtime does not implement named.

Which settings the runtime honours (``planner/runtime/``): the degrees (tp, pp, vpp, cp, ep, etp, dp,
edp), the micro-batch, sequence parallelism, an uneven ``layers_per_stage`` of the plan's own model, the
dispatcher kind (refused when it has no runtime module), MoNTA's chunks, TA-MoE's topology-aware loss
and Luffy's sequence migration; the sequence length and the global batch. What it does not implement is
``RUNTIME_LIMITS``: a plan's value there is replaced by what the runtime does, and listed with the
reason (``ignored_plan_fields`` in the record, a warning on screen); ``--strict`` refuses such a plan,
and a ``--set`` that asks for one is refused. The prediction then prices what runs.

Sizes. Running the plan's own model takes its sequence length and global batch; another model (tiny-moe
on CPU) runs the plan's layout at sequence 64 and two micro-batches per data-parallel rank (one per
pipeline stage with more stages), unless ``--seq-len``/``--gbs`` say otherwise. Ranks: ``--nproc``, the
testbed's, or the plan's GPU count placed as the plan's nodes (``--ranks-per-node`` overrides).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.catalog import load_cluster, load_model, resolve_cluster
from planner.costmodel.dispatchers import dispatcher
from planner.costmodel.routing import topology_aware_remote_fraction
from planner.errors import SpecError
from planner.execution.checkpoint_dir import (
    check_checkpoint_dir,
    check_resume,
    checkpoint_layout,
    latest_checkpoint,
)
from planner.execution.devices import Backend, choose_backend
from planner.execution.launcher import RankPlacement, under_torchrun
from planner.feasibility import check_grid
from planner.runtime.run_options import RunOptions, unsupported
from planner.schema import ClusterProfile, ModelSpec, ParallelConfig, TrainingSpec
from planner.specfiles import validate_spec
from planner.workflows.layouts import assign, default_document, validated_layout
from planner.workflows.plans import PlanFile, read_plan
from planner.workflows.run import placement_for

__all__ = [
    "CPU_SEQ_LEN",
    "RUNTIME_LIMITS",
    "RUNTIME_RUNS",
    "IgnoredField",
    "RunAsk",
    "RunRequest",
    "build_run_request",
    "cluster_for_run",
]

CPU_SEQ_LEN = 64
"""Sequence length of a plan's layout run with another (CPU-sized) model, unless --seq-len says."""


RUNTIME_RUNS: tuple[str, ...] = (
    "parallel.tp", "parallel.pp", "parallel.vpp", "parallel.cp", "parallel.ep", "parallel.etp", "parallel.dp",
    "parallel.edp", "parallel.micro_batch", "parallel.sequence_parallel", "parallel.layers_per_stage",
    "parallel.dispatcher.kind", "parallel.dispatcher.num_chunks", "parallel.dispatcher.topology_aware_routing",
    "parallel.dispatcher.sequence_migration", "training.seq_len", "training.global_batch",
)  # fmt: skip
"""Plan settings the bundled runtime runs as the plan says (a kind without a runtime module is refused).
With ``RUNTIME_LIMITS`` they cover every setting of a plan's ``parallel`` and ``training``: a test keeps it
so, so a new setting needs a decision here before a plan can carry it."""


@dataclass(frozen=True, slots=True)
class RuntimeLimit:
    """A plan setting the runtime does not implement: what it does instead, and why."""

    runs: Any
    """The value that runs."""
    reason: str


RUNTIME_LIMITS: dict[str, RuntimeLimit] = {
    "parallel.recompute": RuntimeLimit("none", "the bundled runtime keeps every activation (no recompute)"),
    "parallel.recompute_modules": RuntimeLimit(
        [], "the bundled runtime keeps every activation (no recompute)"
    ),
    "parallel.distributed_optimizer": RuntimeLimit(
        False, "the bundled runtime all-reduces gradients and keeps the whole optimizer state on every rank"
    ),
    "parallel.fsdp": RuntimeLimit(False, "the bundled runtime does not shard parameters (no FSDP)"),
    "parallel.dp_sharding": RuntimeLimit(
        "megatron", "the bundled runtime shards no data-parallel state (no FSDP2; see distributed_optimizer)"
    ),
    "parallel.grouped_gemm": RuntimeLimit(
        False, "the bundled runtime runs each local expert's GEMMs in turn (no grouped GEMM kernel)"
    ),
    "parallel.a2a_overlap": RuntimeLimit(
        False, "the bundled runtime does not overlap expert-parallel communication with compute"
    ),
    "parallel.delay_wgrad_compute": RuntimeLimit(
        False, "the bundled runtime computes each weight gradient in its module's backward"
    ),
    "parallel.moe_router_fusion": RuntimeLimit(
        False,
        "the bundled runtime routes with its own torch operations (no Transformer Engine router fusion)",
    ),
    "parallel.tp_comm_overlap": RuntimeLimit(
        False, "the bundled runtime runs its TP collectives between the GEMMs (no userbuffers)"
    ),
    "parallel.overlap_grad_reduce": RuntimeLimit(
        False, "the bundled runtime all-reduces the gradients after the backward (no overlap)"
    ),
    "parallel.dispatcher.backend": RuntimeLimit(
        None,
        "the bundled runtime runs its own implementation of the dispatcher, not DeepEP or Hybrid-EP kernels",
    ),
    "parallel.dispatcher.num_sms": RuntimeLimit(
        None, "the bundled runtime runs its own dispatch kernels, on no fixed number of SMs"
    ),
    "parallel.dispatcher.condense_fraction": RuntimeLimit(
        0.0,
        "the bundled runtime condenses tokens by cosine similarity (--condense-threshold), not by a fraction; "
        "the record's condensed_fraction is the fraction it condensed",
    ),
    "parallel.optimizer.main_grads_dtype": RuntimeLimit(
        "fp32", "the bundled runtime keeps gradients in the parameters' dtype (float32)"
    ),
    "parallel.optimizer.precision_aware": RuntimeLimit(
        False, "the bundled runtime steps torch's Adam on the GPU (no precision-aware optimizer)"
    ),
    "parallel.attention_backend": RuntimeLimit(
        "fused", "the bundled runtime computes attention with torch's scaled_dot_product_attention"
    ),
    "parallel.cuda_graphs": RuntimeLimit(
        [], "the bundled runtime launches every kernel eagerly: it captures no CUDA graphs"
    ),
    "parallel.fp8_param_gather": RuntimeLimit(
        False, "the bundled runtime computes in float32 and gathers no FP8 weights"
    ),
    "parallel.optimizer.param_remainders": RuntimeLimit(
        True, "the bundled runtime has no precision-aware optimizer: its Adam steps float32 parameters"
    ),
    "parallel.optimizer.exp_avg_dtype": RuntimeLimit(
        "fp32", "the bundled runtime keeps Adam's moments in float32"
    ),
    "parallel.optimizer.offload_fraction": RuntimeLimit(
        0.0, "the bundled runtime keeps the optimizer on the GPU (no CPU offload)"
    ),
    "parallel.optimizer.overlap_offload": RuntimeLimit(False, "the bundled runtime offloads nothing"),
    "training.precision": RuntimeLimit(
        "float32",
        "the bundled runtime computes in float32 (no BF16/FP8 autocast); the prediction prices the plan's precision",
    ),
    "training.routing": RuntimeLimit(
        "dropless", "the bundled runtime routes with its learnt router and drops no token"
    ),
    "training.capacity_factor": RuntimeLimit(None, "the bundled runtime drops no token (no expert capacity)"),
}
"""Plan settings the runtime does not implement (dotted path -> what runs instead, and why)."""


@dataclass(frozen=True, slots=True)
class IgnoredField:
    """A plan setting the run does not honour."""

    field: str
    value: Any
    runs: Any
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"field": self.field, "value": self.value, "runs": self.runs, "reason": self.reason}

    def __str__(self) -> str:
        return f"{self.field} {self.value!r} is not run ({self.runs!r} runs instead): {self.reason}"


@dataclass(frozen=True)
class RunAsk:
    """What the user asked ``moeplan run`` for (flags as given; None: not given)."""

    plan_path: Path | None = None
    model: str | None = None
    nproc: int | None = None
    testbed: bool = False
    ranks_per_node: int | None = None
    assignments: tuple[tuple[str, Any], ...] = ()
    """Changes to the plan's (or the defaults') settings: the layout flags and ``--set``, as dotted paths."""
    steps: int = 20
    seed: int = 0
    cluster: str | None = None
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    resume: bool = False
    timeout_s: float = 60.0
    backend: Backend = "auto"
    condense_threshold: float | None = None
    strict: bool = False


@dataclass(frozen=True)
class RunRequest:
    """What every rank runs, where the ranks run, and what of the plan does not run."""

    options: RunOptions
    placement: RankPlacement | None
    """None: this process is one rank of a torchrun job."""
    training: TrainingSpec
    """The sequence length and global batch that run, as the cost model prices them."""
    ignored: tuple[IgnoredField, ...]
    notes: tuple[str, ...]
    plan: PlanFile | None


def _is_own_model(found: PlanFile | None, model: str | None) -> bool:
    if found is None:
        return False
    ref = found.plan.model
    return model is None or model in (ref.name, ref.path)


def _base_document(found: PlanFile | None, own_model: bool, notes: list[str]) -> dict[str, Any]:
    if found is None:
        return default_document()
    document = found.plan.model_dump(mode="json", include={"training", "parallel"})
    if not own_model and document["parallel"]["layers_per_stage"] is not None:
        # The plan's uneven stage split belongs to its model's layers.
        document["parallel"]["layers_per_stage"] = None
        notes.append(
            "the plan's uneven layers_per_stage was not used: it splits the plan's model, not this one"
        )
    return document


def _get(document: dict[str, Any], field: str) -> Any:
    node: Any = document
    for key in field.split("."):
        node = node[key]
    return node


def _set(document: dict[str, Any], field: str, value: Any) -> None:
    *parents, leaf = field.split(".")
    node = document
    for key in parents:
        node = node[key]
    node[leaf] = value


def _runtime_limits(
    document: dict[str, Any], asked: set[str], condense_threshold: float | None
) -> list[IgnoredField]:
    """Put what the runtime runs in place of each setting it does not implement; the replaced settings.

    A setting the user asked for (``asked``) is refused instead. The precision stays as it is in the
    document: the cost model prices the plan's precision (it has no float32).
    """
    replaced = []
    for field, limit in RUNTIME_LIMITS.items():
        value = _get(document, field)
        if value == limit.runs:
            continue
        if field in asked:
            raise SpecError(
                f"{field} {value!r} asks for what the bundled runtime does not run: {limit.reason}"
            )
        runs = limit.runs
        if field == "parallel.dispatcher.condense_fraction" and condense_threshold is not None:
            runs = f"condensation at cosine similarity above {condense_threshold}"
        if field != "training.precision":
            _set(document, field, limit.runs)
        replaced.append(IgnoredField(field, value, runs, limit.reason))
    return replaced


def runs_as_rank(ask: RunAsk) -> bool:
    """Whether this process is itself one rank of a torchrun job, rather than starting the ranks."""
    return under_torchrun() and not ask.testbed and ask.nproc is None


def _world(ask: RunAsk, found: PlanFile | None) -> tuple[int, int, RankPlacement | None]:
    """(world size, ranks per node, placement); no placement when this process is a torchrun rank."""
    if runs_as_rank(ask):
        world = int(os.environ["WORLD_SIZE"])
        return world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))), None
    ranks = ask.nproc if ask.nproc is not None or ask.testbed or found is None else found.plan.num_gpus
    per_node = ask.ranks_per_node
    if per_node is None and found is not None and not ask.testbed and ranks == found.plan.num_gpus:
        per_node = found.plan.num_gpus_per_node  # the plan's own world, placed as the plan's nodes
    placement = placement_for(ranks, ask.testbed, per_node)
    return len(placement.prefixes), placement.ranks_per_node, placement


def cluster_for_run(cluster: str | None, found: PlanFile | None) -> ClusterProfile:
    """The profile a run's prediction and TA-MoE's target use: ``--cluster``, the plan's, else the default
    (the last probe, else the bundled default)."""
    if cluster:
        return load_cluster(cluster)
    if found is not None:
        return found.cluster()
    return resolve_cluster(None).profile


def _topology_remote_share(
    parallel: ParallelConfig, ranks_per_node: int, profile: Callable[[], ClusterProfile]
) -> float | None:
    """TA-MoE's target share of off-node copies: the cost model's balance of the profile's intra- and
    inter-node all-to-all bandwidths (``topology_aware_remote_fraction``)."""
    if not parallel.dispatcher.topology_aware_routing:
        return None
    cluster = profile()
    links = cluster.links
    if "inter_node" not in links or "intra_node" not in links:
        raise SpecError(
            f"topology-aware routing needs intra_node and inter_node all-to-all bandwidths, and profile "
            f"'{cluster.name}' lacks one: probe a cluster of two or more nodes, or pass --cluster"
        )
    share = topology_aware_remote_fraction(
        parallel.ep,
        min(parallel.ep, ranks_per_node),
        links["intra_node"].collectives["all_to_all"].bandwidth_gbps,
        links["inter_node"].collectives["all_to_all"].bandwidth_gbps,
    )
    return share if share > 0 else None


def _without_tp_duplicates_sp(parallel: ParallelConfig, asked: set[str], notes: list[str]) -> ParallelConfig:
    """A dispatcher that removes the TP ranks' duplicate tokens runs without sequence parallelism, unless
    the user asked for it (then the runtime's refusal says why not)."""
    kind = dispatcher(parallel.dispatcher.kind)
    if not (kind.deduplicates_tp and parallel.sequence_parallel and parallel.tp > 1):
        return parallel
    if "parallel.sequence_parallel" in asked:
        return parallel
    notes.append(
        f"sequence parallelism off: the {kind.kind} dispatcher removes the duplicate tokens TP ranks hold "
        "without it"
    )
    return parallel.model_copy(update={"sequence_parallel": False})


def _check_grid(parallel: ParallelConfig, world: int, found: PlanFile | None) -> None:
    """The degrees must tile the run's ranks (a plan's were chosen for its own GPU count)."""
    broken = [str(v) for v in check_grid(parallel, world)]
    if not broken:
        return
    hint = (
        f"; the plan's degrees are for its {found.plan.num_gpus} GPUs: change them for {world} ranks "
        "(--tp, --ep, ... or --set parallel.*), or run on its own count"
        if found is not None and found.plan.num_gpus != world
        else ""
    )
    raise SpecError(f"the run's layout does not fit its {world} ranks: {'; '.join(broken)}{hint}")


def build_run_request(ask: RunAsk) -> RunRequest:
    """Everything ``moeplan run`` needs before starting ranks; SpecError for anything it cannot run."""
    found = read_plan(ask.plan_path) if ask.plan_path is not None else None
    if ask.model is None and found is None:
        raise SpecError("moeplan run needs --model, or --plan with a model")
    if ask.resume and ask.checkpoint_dir is None:
        raise SpecError("--resume needs --checkpoint-dir (where the checkpoints are)")
    if ask.checkpoint_dir is not None:
        check_checkpoint_dir(ask.checkpoint_dir)
        if ask.resume and latest_checkpoint(ask.checkpoint_dir) is None:
            raise SpecError(f"--resume: '{ask.checkpoint_dir}' holds no checkpoint to resume (no 'latest').")
    if ask.cluster is not None:
        load_cluster(
            ask.cluster
        )  # a --cluster that cannot be read is bad input now, not a dropped prediction
    own_model = _is_own_model(found, ask.model)
    model: ModelSpec = found.model() if own_model and found is not None else load_model(ask.model or "")
    notes: list[str] = []
    document = _base_document(found, own_model, notes)
    world, per_node, placement = _world(ask, found)
    asked = {field for field, _ in ask.assignments}
    assign(document, ask.assignments)
    replaced = _runtime_limits(document, asked, ask.condense_threshold)
    ignored = replaced if found is not None else []  # without a plan, the defaults are not the user's
    if ask.strict and ignored:
        raise SpecError(
            "--strict: the bundled runtime does not run every setting of the plan: "
            + "; ".join(str(i) for i in ignored)
        )
    planned_training, parallel = validated_layout(document, world)
    parallel = _without_tp_duplicates_sp(parallel, asked, notes)
    _check_grid(parallel, world, found)
    # Running a plan's own model means running the plan: its sizes are the defaults. Another model runs
    # the plan's layout at CPU-sized defaults.
    keep_sizes = own_model and found is not None
    seq_len = planned_training.seq_len if keep_sizes or "training.seq_len" in asked else CPU_SEQ_LEN
    global_batch = (
        planned_training.global_batch
        if keep_sizes or "training.global_batch" in asked
        else parallel.dp * parallel.micro_batch * max(2, parallel.pp)
    )
    training = planned_training.model_copy(update={"seq_len": seq_len, "global_batch": global_batch})
    model_name = ask.model or (found.plan.model.path or found.plan.model.name if found else "model")
    fields = {
        "model": model, "model_name": model_name, "parallel": parallel, "steps": ask.steps, "seed": ask.seed,
        "backend": choose_backend(ask.backend, per_node),
        "seq_len": seq_len, "global_batch": global_batch, "ranks_per_node": per_node,
        "condense_threshold": ask.condense_threshold, "started": time.time(), "timeout_s": ask.timeout_s,
        "topology_remote_share": _topology_remote_share(parallel, per_node, lambda: cluster_for_run(ask.cluster, found)),
        "checkpoint_dir": str(ask.checkpoint_dir.resolve()) if ask.checkpoint_dir else None,
        "checkpoint_every": ask.checkpoint_every, "keep_checkpoints": ask.keep_checkpoints, "resume": ask.resume,
    }  # fmt: skip
    options = validate_spec(RunOptions, fields, "the run options")
    if options.resume and options.checkpoint_dir is not None:  # the checkpoint's layout must be this run's
        layout = checkpoint_layout(options.model_name, options.model, options.parallel)
        check_resume(Path(options.checkpoint_dir), layout)
    from planner.runtime.dispatchers import refusal  # imports the kind's module, and torch: run needs it

    reason = unsupported(options) or refusal(options.parallel)
    if reason:
        raise SpecError(reason)
    return RunRequest(options, placement, training, tuple(ignored), tuple(notes), found)
