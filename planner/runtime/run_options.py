"""What ``moeplan run`` tells every rank, and what rank 0 reports back (torch-free: the launching parent
and the CLI import this without torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt

from planner.runtime.groups import chunk_layers
from planner.schema import ModelSpec, ParallelConfig
from planner.schema._base import Spec

__all__ = ["RunOptions", "RunResults", "StepRecord", "unsupported"]


class RunOptions(Spec):
    """One run: the model, the layout, the training settings, and where to write the record."""

    model: ModelSpec
    model_name: str
    """Catalog name or file the model came from (for the report)."""
    parallel: ParallelConfig
    backend: Literal["gloo", "nccl"]
    steps: PositiveInt
    seed: int = 0
    seq_len: PositiveInt
    global_batch: PositiveInt
    """Sequences per optimizer step, over all data-parallel ranks."""
    lr: PositiveFloat = 1e-2
    ranks_per_node: PositiveInt
    """Ranks per node (node-contiguous placement): which peers are across the inter-node link."""
    topology_remote_share: float | None = Field(default=None, gt=0, le=1)
    """TA-MoE (when the dispatcher's ``topology_aware_routing`` is on): the share of a token's copies to
    other EP ranks that the topology-aware loss's target sends off the node (the CLI derives it from the
    cluster profile's link bandwidths, as the cost model does)."""
    condense_threshold: float | None = Field(default=None, gt=0)
    """Luffy condensation: cosine similarity above which a token reuses another's expert output."""
    started: float
    """Wall-clock epoch seconds of the launch."""
    timeout_s: PositiveFloat = 60.0
    """Collective timeout: a dead rank makes the others fail after this long instead of hanging."""
    results_path: str | None = None
    """Where rank 0 writes the record (launched ranks)."""
    checkpoint_dir: str | None = None
    """Where checkpoints go (``planner/runtime/checkpoint.py``); None for none."""
    checkpoint_every: PositiveInt = 10
    """Steps between checkpoints (the last step is always saved when a directory is given)."""
    keep_checkpoints: PositiveInt = 2
    """Checkpoints kept in ``checkpoint_dir``: after each save rank 0 removes the older ones (the newest
    and one before it by default, in case the newest proves bad)."""
    resume: bool = False
    """Continue from the newest complete checkpoint in ``checkpoint_dir`` (written by the same layout)."""
    dump_gradients: str | None = None
    """Where rank 0 saves (torch.save) the full model's gradients after the first step's synchronisation,
    experts gathered from the EP group: how tests compare a layout with a single process."""


class StepRecord(Spec):
    """One optimizer step as rank 0 saw it."""

    step: int = Field(ge=0)
    loss: float
    """Language-model loss averaged over data-parallel ranks (auxiliary losses excluded)."""
    time_s: PositiveFloat
    """Wall-clock seconds of the step, slowest rank."""


class RunResults(Spec):
    """What a run measured."""

    model_name: str
    parallel: ParallelConfig
    world_size: PositiveInt
    backend: str
    steps: tuple[StepRecord, ...]
    bytes_per_link_class: dict[str, float]
    """Bytes all ranks sent per step over each link class (mean over the timed steps), counted by the runtime."""
    bytes_per_collective: dict[str, float]
    """The same bytes by collective kind (dispatch, combine, all_gather, dp_grad_all_reduce)."""
    collectives: dict[str, float]
    """Seconds per step in each collective kind, slowest rank (mean over the timed steps)."""
    peak_memory_bytes: int = Field(ge=0)
    """Peak memory of the busiest rank: CUDA max allocated, or the process's peak resident set on CPU."""
    condensed_fraction: float | None = None
    """Fraction of (token, expert) pairs condensation did not send, when condensation is on."""
    migrated_fraction: float | None = None
    """Fraction of (sequence, MoE layer) decisions that moved the sequence, under sequence migration."""


def unsupported(options: RunOptions) -> str | None:
    """Why the runtime cannot run this layout yet (None when it can). Torch-free callers use it too.

    What a dispatcher kind cannot run is the kind's own rule: ``planner.runtime.dispatchers.refusal``
    (which imports the kind's module, and torch), checked beside this one before any rank starts."""
    p = options.parallel
    if p.cp > 1 and options.seq_len % (2 * p.cp):
        return (
            f"seq_len ({options.seq_len}) must be a multiple of 2 x cp = {2 * p.cp}: context parallelism "
            "gives each CP rank two equal chunks of every sequence (Megatron's load-balanced split)"
        )
    reason = _expert_tensor_rules(options) or _migration_rules(options) or _topology_rules(options)
    if reason:
        return reason
    shard = options.global_batch / (p.dp * p.micro_batch)
    if shard != int(shard):
        return (
            f"global batch {options.global_batch} must be a multiple of dp x micro_batch = {p.dp} x "
            f"{p.micro_batch}"
        )
    reason = _pipeline_rules(options, int(shard))
    if reason:
        return reason
    if options.model.num_experts and options.model.num_experts % p.ep:
        return f"ep ({p.ep}) must divide the model's {options.model.num_experts} experts"
    m = options.model
    split = {
        "attention heads": m.num_attention_heads,
        "key/value groups": m.num_query_groups or m.num_attention_heads,
        "dense FFN width": m.ffn_hidden_size,
        "shared expert width": m.shared_expert_ffn_hidden_size or 0,
    }
    if p.sequence_parallel and p.tp > 1:
        split["sequence length" if p.cp == 1 else "sequence length per CP rank"] = options.seq_len // p.cp
    uneven = [f"{what} ({n})" for what, n in split.items() if n % p.tp]
    if uneven:
        return (
            f"tp ({p.tp}) must divide the model's {', '.join(uneven)}: tensor parallelism splits them evenly"
        )
    return None


def _pipeline_rules(options: RunOptions, micro_batches: int) -> str | None:
    """What torch's pipeline schedules and Megatron's interleaving need of a layout."""
    p, layers = options.parallel, options.model.num_layers
    if p.pp == 1:
        return None if p.vpp == 1 else f"vpp ({p.vpp}) needs pipeline parallelism: pp is 1"
    if micro_batches < p.pp:
        return (
            f"pp ({p.pp}) needs at least as many micro-batches per data-parallel rank, and global batch "
            f"{options.global_batch} gives {micro_batches} (dp {p.dp} x micro-batch {p.micro_batch}): raise "
            "--gbs (1F1B fills the pipeline with one micro-batch per stage)"
        )
    if p.vpp > 1 and micro_batches % p.pp:
        return (
            f"the interleaved schedule (vpp {p.vpp}) needs the micro-batches per data-parallel rank "
            f"({micro_batches}) to be a multiple of pp ({p.pp}), as Megatron requires"
        )
    try:
        chunk_layers(layers, p.pp, p.vpp, p.layers_per_stage)
    except ValueError as exc:
        return str(exc)
    return None


def _migration_rules(options: RunOptions) -> str | None:
    """What the runtime's sequence migration needs: whole sequences on single ranks, the flat all-to-all."""
    p = options.parallel
    if not p.dispatcher.sequence_migration:
        return None
    split = {name: getattr(p, name) for name in ("tp", "cp", "pp", "etp") if getattr(p, name) > 1}
    if split:
        named = ", ".join(f"{name} {value}" for name, value in split.items())
        return (
            f"sequence migration moves whole sequences between expert-parallel ranks, and {named} splits "
            "them or the model: run it with tp, cp, pp and etp 1"
        )
    if p.ep == 1:
        return "sequence migration moves sequences between expert-parallel ranks: it needs ep > 1"
    if p.dispatcher.kind != "alltoall":
        return (
            f"sequence migration runs with the alltoall dispatcher in the bundled runtime, not "
            f"{p.dispatcher.kind!r}"
        )
    if options.condense_threshold is not None:
        return "sequence migration with condensation is not implemented: run one of them"
    if p.dispatcher.topology_aware_routing:
        return "sequence migration with topology-aware routing (TA-MoE) is not implemented: run one of them"
    return None


def _topology_rules(options: RunOptions) -> str | None:
    """What TA-MoE's topology-aware loss needs: expert parallelism and the target's remote share."""
    p = options.parallel
    if not p.dispatcher.topology_aware_routing:
        return None
    if p.ep == 1:
        return "topology-aware routing (TA-MoE) steers tokens between expert-parallel ranks: it needs ep > 1"
    if options.topology_remote_share is None:
        return "topology-aware routing (TA-MoE) needs topology_remote_share (moeplan run sets it from the profile)"
    return None


def _expert_tensor_rules(options: RunOptions) -> str | None:
    """What expert tensor parallelism needs of a layout."""
    p, m = options.parallel, options.model
    if p.etp == 1:
        return None
    width = m.moe_ffn_hidden_size or m.ffn_hidden_size
    if width % p.etp:
        return f"etp ({p.etp}) must divide the experts' FFN width ({width}): it splits every expert's columns"
    return None
