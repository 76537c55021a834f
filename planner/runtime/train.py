"""One rank of ``moeplan run``: build the plan's process groups and the model, train, measure, report.

What is implemented (and what is not yet, refused with a clear error before any rank starts, see
:func:`planner.runtime.run_options.unsupported`):
- **Groups** from the plan in Megatron's rank order (``planner/runtime/groups.py``): every rank creates
  every group, in the same order, as ``torch.distributed.new_group`` requires.
- **Expert parallelism** with the plan's dispatcher (``planner/runtime/dispatchers/``, one module per kind): flat all-to-all,
  hierarchical (node-deduplicated) and MoNTA (TP-deduplicated, chunked), optionally with Luffy's
  condensation.
- **Tensor parallelism** splits attention and the dense FFNs Megatron's way
  (``planner/runtime/tensor_parallel.py``). Without sequence parallelism every TP rank holds the same
  tokens, the setting MoNTA deduplicates; with it each TP rank holds 1/t of the sequence, its loss is
  scaled by 1/t and the partial gradients of the whole parameters outside the split blocks are summed
  over TP.
- **Data parallelism**: gradients summed over the data-parallel group (dense) and the expert
  data-parallel group (experts), scaled so that the step equals a single process that runs every
  micro-batch of the global batch (gradient accumulation): dense by 1/DP; experts by 1/(DP x TP) under
  flat and hierarchical dispatch without sequence parallelism, where each TP rank's copy of a token
  back-propagates the same loss through the experts, and by 1/DP under MoNTA (each token sent once per
  TP group) or sequence parallelism (each token held by one TP rank).
  ``tests/runtime/test_run.py`` checks gradients and losses against one process for eight layouts.
- **Checkpoints** with torch.distributed.checkpoint every ``checkpoint_every`` steps and at the end,
  made visible atomically; ``resume`` continues from the newest one with the same loss curve (the data
  of a step depends only on its index, and nothing else is random).
- **Faults**: every collective has ``timeout_s``; a rank that dies makes the launcher stop the others
  at once (locally), and under torchrun the survivors fail at the timeout instead of hanging.
- **Pipeline parallelism** with torch.distributed.pipelining's 1F1B and interleaved 1F1B schedules
  (``planner/runtime/pipeline.py``): each rank keeps only its chunks' layers; MoE auxiliary losses
  reach their routers through the backward as in Megatron.
- **Expert tensor parallelism** (``planner/runtime/expert_tensor_parallel.py``): every expert's FFN
  columns split over the ETP group, the peers' routed rows all-gathered before the experts and the
  partial outputs reduce-scattered after them.
- **Context parallelism** (``planner/runtime/context_parallel.py``): each CP rank holds two chunks of
  every sequence (Megatron's load-balanced split); attention gathers the keys and values of the CP
  group; the loss is scaled by 1/CP and dense gradients are summed over the DP x CP ranks.
- **Sequence migration** (Luffy; ``planner/runtime/migration.py``): with the flat all-to-all, each MoE
  layer rebuilds every sequence on the EP member that computed most of its pairs, where it continues.

Measurement per step: wall-clock time (slowest rank), the language-model loss (mean over data-parallel
ranks), bytes each rank sends per link class and collective kind (``planner/runtime/meter.py``),
time in each collective kind, and peak memory.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from planner.execution.checkpoint_dir import checkpoint_layout
from planner.execution.launcher import ProgressFn, print_progress, write_record
from planner.execution.process_group import joined, subgroup
from planner.runtime.checkpoint import load_latest, save
from planner.runtime.context_parallel import shard_context_parallel
from planner.runtime.data import batch
from planner.runtime.dispatchers import DispatcherSetup, dispatcher_factory, refusal, sends_tp_duplicates
from planner.runtime.dispatchers._condensing import Condensing
from planner.runtime.expert_tensor_parallel import expert_shard_dims, shard_expert_tensor_parallel
from planner.runtime.groups import GroupLayout, chunk_layers, group_layout
from planner.runtime.meter import TrafficMeter
from planner.runtime.migration import SequenceMigration, SequenceTracker, migrated_cross_entropy
from planner.runtime.model import (
    MoETransformer,
    RuntimeModelConfig,
    expert_parameters,
    init_parameters,
    merge_ep_states,
)
from planner.runtime.pipeline import PipelinePlan, pipeline_plan
from planner.runtime.protocols import TokenDispatcher
from planner.runtime.run_options import RunOptions, RunResults, StepRecord, unsupported
from planner.runtime.tensor_parallel import (
    merge_tp_states,
    sequence_chunk,
    sequence_parallel_sums,
    shard_dims,
    shard_tensor_parallel,
)

__all__ = ["main", "run_rank"]


def _groups(layout: GroupLayout, axes: tuple[str, ...]) -> dict[str, dist.ProcessGroup]:
    """This rank's group of each axis, creating every group of every axis on every rank (collective)."""
    rank = dist.get_rank()
    mine = {}
    for axis in axes:
        for ranks in layout.groups[axis]:
            group = subgroup(ranks)
            if rank in ranks:
                mine[axis] = group
    return mine


def _dispatcher_factory(
    options: RunOptions, layout: GroupLayout, groups: dict[str, dist.ProcessGroup], meter: TrafficMeter
) -> Callable[[int], TokenDispatcher]:
    """The plan's dispatcher kind from the registry (collective: it may create process groups), each
    layer's wrapped in Luffy's condensation when a threshold is set."""
    setup = DispatcherSetup(
        parallel=options.parallel, num_experts=options.model.num_experts or 1,
        ranks_per_node=options.ranks_per_node, groups=groups, ep_groups=layout.groups["ep"], meter=meter,
    )  # fmt: skip
    build = dispatcher_factory(setup)
    threshold = options.condense_threshold
    if threshold is None:
        return build

    def condensed(layer: int) -> TokenDispatcher:
        return Condensing(build(layer), threshold)

    return condensed


def _ring_all_reduce(tensors: list[torch.Tensor], group_ranks: list[int], group: dist.ProcessGroup,
                     meter: TrafficMeter, kind: str) -> None:  # fmt: skip
    """Sum ``tensors`` over a group (one flat buffer) and count a ring's bytes: 2(n-1)/n of the buffer to
    the next rank of the ring (the traffic nccl-tests' all_reduce busbw factor describes)."""
    n = len(group_ranks)
    if n == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    with meter.timed(kind):
        dist.all_reduce(flat, group=group)
    me = group_ranks.index(dist.get_rank())
    meter.add_bytes(
        kind, [group_ranks[(me + 1) % n]], [int(2 * (n - 1) / n * flat.numel() * flat.element_size())]
    )
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def run_rank(options: RunOptions, progress: ProgressFn | None = None) -> RunResults | None:
    """This rank's share of the run; rank 0 returns the record, the others None."""
    with joined(options.backend, options.timeout_s) as device:
        return _train(options, device, progress)


def _train(options: RunOptions, device: torch.device, progress: ProgressFn | None) -> RunResults | None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0 and progress is not None:
        progress(0, options.steps, f"{world} ranks joined: building the model")
    reason = unsupported(options) or refusal(options.parallel)
    if reason:
        raise ValueError(reason)
    p = options.parallel
    layout = group_layout(p, world)
    groups = _groups(layout, ("tp", "dp", "ep", "edp", "pp", "etp", "cp", "dp_cp", "tp_cp"))
    meter = TrafficMeter(rank, options.ranks_per_node)
    config = RuntimeModelConfig.from_spec(options.model)
    ep_ranks = layout.group_of("ep", rank)
    factory = _dispatcher_factory(options, layout, groups, meter)
    torch.manual_seed(options.seed)
    model = MoETransformer(config, ep_ranks.index(rank), p.ep, factory).to(device)
    init_parameters(model, options.seed)
    if p.dispatcher.topology_aware_routing:
        model.set_topology_target(_topology_target(options, layout.group_of("ep", rank), rank).to(device))
    tp_ranks = layout.group_of("tp", rank)
    sequence_parallel = p.sequence_parallel and p.tp > 1
    # After init: the TP slices come from the whole weights.
    shard_tensor_parallel(model, groups["tp"], tp_ranks, meter, sequence_parallel)
    shard_expert_tensor_parallel(model, groups["etp"], layout.group_of("etp", rank), meter)
    # The ranks that hold different tokens of the same sequences: the routers' statistics cover them all.
    token_axis = "tp_cp" if sequence_parallel else "cp"
    context = shard_context_parallel(
        model, options.seq_len, groups["cp"], layout.group_of("cp", rank),
        (groups[token_axis], layout.group_of(token_axis, rank)), meter,
    )  # fmt: skip
    local_seq = options.seq_len // p.cp  # the tokens of each sequence this rank's attention sees
    expert_names = set(expert_parameters(model))
    dp_rank = layout.group_of("dp", rank).index(rank)
    # Dense gradients are partial over the CP ranks too (each holds part of every sequence).
    dense_sum_ranks = layout.group_of("dp_cp", rank)
    per_rank = options.global_batch // p.dp
    accumulation = per_rank // p.micro_batch
    # Without sequence parallelism every TP rank holds the same tokens. A kind that sends each of the t
    # copies to the experts (SENDS_TP_DUPLICATES) back-propagates each copy's (identical) loss: expert
    # gradients come out t times too large. MoNTA sends each token once per TP group.
    # With sequence parallelism each TP rank holds its own tokens: nothing is duplicated.
    expert_replicas = p.tp if sends_tp_duplicates(p) and not sequence_parallel else 1
    # Under sequence parallelism a rank's loss is the mean over its 1/t of the tokens: scaled by 1/t, the
    # TP ranks' losses add up to the mean over all of them. Context parallelism likewise, by 1/cp.
    loss_scale = accumulation * (p.tp if sequence_parallel else 1) * p.cp
    pipeline = None
    if p.pp > 1:
        chunks = chunk_layers(config.num_layers, p.pp, p.vpp, p.layers_per_stage)
        pipeline = pipeline_plan(
            model, chunks, layout.group_of("pp", rank), groups["pp"], device, accumulation, local_seq,
            loss_scale,
        )  # fmt: skip
        _keep_own_chunks(model, pipeline)
    partial_over_tp = sequence_parallel_sums(model) if sequence_parallel else []
    loss_of = _migrating_loss(model, groups["ep"], meter) if p.dispatcher.sequence_migration else model.loss
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr)
    dense = [prm for name, prm in model.named_parameters() if name not in expert_names]
    routed = [prm for name, prm in model.named_parameters() if name in expert_names]
    activation_bytes = (
        p.micro_batch * (local_seq // p.tp if sequence_parallel else local_seq)
        * config.hidden_size * next(model.parameters()).element_size()
    )  # fmt: skip
    records: list[StepRecord] = []
    checkpoints = Path(options.checkpoint_dir) if options.checkpoint_dir else None
    first_step = 0
    run_layout = checkpoint_layout(  # what a checkpoint records, and a resume must match
        options.model_name, options.model, options.parallel
    )
    if checkpoints is not None and options.resume:
        saved = load_latest(checkpoints, model, optimizer, run_layout)
        if saved is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {checkpoints} (no 'latest' file)")
        first_step = saved + 1

    def rank_batch(first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences ``first .. first + count`` of the data, the labels this rank's logits predict."""
        ids, labels = batch(range(first, first + count), options.seq_len, config.vocab_size, options.seed)
        if context is not None:
            ids, labels = context.chunk(ids), context.chunk(labels)
        if sequence_parallel:
            labels = sequence_chunk(labels, tp_ranks)
        return ids.to(device), labels.to(device)

    for step in range(first_step, options.steps):
        if rank == 0 and progress is not None:
            progress(step, options.steps, f"step {step + 1} of {options.steps}")
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)
        lm_loss = torch.zeros((), dtype=torch.float64)
        first = step * options.global_batch + dp_rank * per_rank
        if pipeline is not None:  # the schedule splits the rank's sequences into micro-batches
            pipeline.step(*rank_batch(first, per_rank))
            pipeline.count_sends(meter, activation_bytes, accumulation)
            lm_loss += sum(float(ce) for ce in pipeline.cross_entropies) / accumulation
        else:
            for micro in range(accumulation):
                loss, aux = loss_of(*rank_batch(first + micro * p.micro_batch, p.micro_batch))
                (loss / loss_scale).backward()  # type: ignore[no-untyped-call]
                lm_loss += float((loss - aux).detach()) / accumulation
        for prm in model.parameters():
            if prm.grad is None:  # an expert that received no token this step
                prm.grad = torch.zeros_like(prm)
        _ring_all_reduce(
            [prm.grad for prm in partial_over_tp if prm.grad is not None], tp_ranks, groups["tp"], meter,
            "sp_grad_all_reduce",
        )  # fmt: skip
        dense_grads = [prm.grad for prm in dense if prm.grad is not None]
        routed_grads = [prm.grad for prm in routed if prm.grad is not None]
        _ring_all_reduce(dense_grads, dense_sum_ranks, groups["dp_cp"], meter, "dp_grad_all_reduce")
        _ring_all_reduce(
            routed_grads, layout.group_of("edp", rank), groups["edp"], meter, "edp_grad_all_reduce"
        )
        with torch.no_grad():
            for grad in dense_grads:
                grad /= p.dp
            for grad in routed_grads:
                grad /= p.dp * expert_replicas
        if step == 0 and options.dump_gradients:
            _dump_gradients(
                model,
                options.dump_gradients,
                groups,
                (len(tp_ranks), p.etp, len(ep_ranks), p.pp),
                expert_names,
            )
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        figures = torch.tensor(
            [time.perf_counter() - start, float(lm_loss)], dtype=torch.float64, device=device
        )
        slowest = figures.clone()
        dist.all_reduce(slowest[:1], op=dist.ReduceOp.MAX)
        dist.all_reduce(figures[1:], op=dist.ReduceOp.SUM)
        # Only the last pipeline stage computes the loss: average over its world / pp ranks.
        records.append(
            StepRecord(step=step, loss=float(figures[1]) / (world // p.pp), time_s=float(slowest[0]))
        )
        if checkpoints is not None and (
            (step + 1) % options.checkpoint_every == 0 or step + 1 == options.steps
        ):
            save(checkpoints, step, model, optimizer, run_layout, options.keep_checkpoints)
    snapshots: list[object] = [None] * world
    dist.all_gather_object(snapshots, {"traffic": meter.snapshot(), "peak": _peak_memory(device),
                                       "condensed": _condensed_fraction(model),
                                       "migrated": _migrated_fraction(model)})  # fmt: skip
    if rank != 0:
        return None
    if progress is not None:
        progress(options.steps, options.steps, "done")
    return _results(options, world, records, snapshots)


def _keep_own_chunks(model: MoETransformer, pipeline: PipelinePlan) -> None:
    """Drop the modules of the other pipeline ranks' chunks: this rank trains, checkpoints and reports
    only its own (parameter names stay those of the whole model)."""
    kept = {id(block) for chunk in pipeline.chunks.values() for block in chunk.blocks}
    for index, block in enumerate(model.layers):
        if id(block) not in kept:
            model.layers[index] = nn.Identity()
    if not pipeline.holds_first:
        model.embedding = nn.Identity()  # type: ignore[assignment]
    if not pipeline.holds_last:
        model.norm = nn.Identity()  # type: ignore[assignment]
        model.lm_head = nn.Identity()  # type: ignore[assignment]


def _dump_gradients(
    model: MoETransformer,
    path: str,
    groups: dict[str, dist.ProcessGroup],
    sizes: tuple[int, int, int, int],
    expert_names: set[str],
) -> None:
    """Rank 0 saves the full model's gradients: its TP group's slices joined, its ETP group's expert
    slices joined, every EP peer's experts concatenated, then every pipeline stage's parameters added."""
    tp_size, etp_size, ep_size, pp_size = sizes
    mine = {
        name: prm.grad.detach().cpu().clone()
        for name, prm in model.named_parameters()
        if prm.grad is not None
    }
    if tp_size > 1:
        mine |= merge_tp_states(_gather_states(mine, groups["tp"], tp_size), shard_dims(model))
    if etp_size > 1:
        mine |= merge_tp_states(_gather_states(mine, groups["etp"], etp_size), expert_shard_dims(model))
    merged = merge_ep_states(_gather_states(mine, groups["ep"], ep_size), expert_names)
    if pp_size > 1:  # rank 0's pipeline peers are their stages' rank 0 of TP and EP: whole stages
        merged = {k: v for state in _gather_states(merged, groups["pp"], pp_size) for k, v in state.items()}
    if dist.get_rank() == 0:
        torch.save(merged, path)


def _gather_states(
    state: dict[str, torch.Tensor], group: dist.ProcessGroup, size: int
) -> list[dict[str, torch.Tensor]]:
    """Every group member's ``state``, in group rank order."""
    gathered: list[object] = [None] * size
    dist.all_gather_object(gathered, state, group=group)
    return [item for item in gathered if isinstance(item, dict)]


def _topology_target(options: RunOptions, ep_ranks: list[int], rank: int) -> torch.Tensor:
    """TA-MoE's target proportions ``c_hat`` [E] for this rank (``planner/runtime/model.py``): its own
    experts keep the uniform share 1/P; of the rest, ``topology_remote_share`` goes to the EP members on
    other nodes and the remainder to the members on this node, evenly within each."""
    members = len(ep_ranks)
    experts = options.model.num_experts or 1
    node = rank // options.ranks_per_node
    local = [r for r in ep_ranks if r != rank and r // options.ranks_per_node == node]
    remote = [r for r in ep_ranks if r // options.ranks_per_node != node]
    share = options.topology_remote_share or 0.0
    if not local:
        share = 1.0
    elif not remote:
        share = 0.0
    rest = (members - 1) / members
    mass = []
    for r in ep_ranks:
        if r == rank:
            mass.append(1 / members)
        elif r in remote:
            mass.append(rest * share / len(remote))
        else:
            mass.append(rest * (1 - share) / len(local))
    per_member = experts // members
    return torch.tensor([m / per_member for m in mass for _ in range(per_member)], dtype=torch.float64)


def _migrating_loss(
    model: MoETransformer, ep_group: dist.ProcessGroup, meter: TrafficMeter
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Turn on sequence migration in every MoE layer; the loss of the sequences a rank holds at the end."""
    tracker = SequenceTracker(ep_group, meter)
    experts = model.config.num_experts
    for layer in model.moe_layers():
        layer.migration = SequenceMigration(ep_group, experts, tracker, meter)
    model.register_forward_pre_hook(lambda _module, args: tracker.start(args[0].shape[0], args[0].device))

    def loss(ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(ids)
        cross_entropy = migrated_cross_entropy(logits, tracker.held_labels(labels), labels.numel())
        aux = model.aux_loss()
        return cross_entropy + aux, aux

    return loss


def _migrated_fraction(model: MoETransformer) -> float | None:
    layers = [
        layer.migration for layer in model.moe_layers() if isinstance(layer.migration, SequenceMigration)
    ]
    decisions = sum(m.decisions for m in layers)
    return sum(m.moved for m in layers) / decisions if decisions else None


def _condensed_fraction(model: MoETransformer) -> float | None:
    fractions = [
        layer.dispatcher.condensed_fraction
        for layer in model.moe_layers()
        if isinstance(layer.dispatcher, Condensing)
    ]
    return sum(fractions) / len(fractions) if fractions else None


def _results(
    options: RunOptions, world: int, records: list[StepRecord], snapshots: list[object]
) -> RunResults:
    steps = len(records)
    per_link: dict[str, float] = {"intra_node": 0.0, "inter_node": 0.0}
    per_kind: dict[str, float] = {}
    seconds: dict[str, float] = {}
    peak = 0
    condensed, migrated = [], []
    for item in snapshots:
        assert isinstance(item, dict)
        traffic = item["traffic"]
        peak = max(peak, int(item["peak"]))
        if item["condensed"] is not None:
            condensed.append(float(item["condensed"]))
        if item["migrated"] is not None:
            migrated.append(float(item["migrated"]))
        for link in per_link:
            per_link[link] += traffic[link] / steps
        for kind, counts in traffic["kinds"].items():
            per_kind[kind] = per_kind.get(kind, 0.0) + (counts["intra_node"] + counts["inter_node"]) / steps
            seconds[kind] = max(seconds.get(kind, 0.0), counts["seconds"] / steps)
    return RunResults(
        model_name=options.model_name,
        parallel=options.parallel,
        world_size=world,
        backend=options.backend,
        steps=tuple(records),
        bytes_per_link_class=per_link,
        bytes_per_collective=per_kind,
        collectives=seconds,
        peak_memory_bytes=peak,
        condensed_fraction=sum(condensed) / len(condensed) if condensed else None,
        migrated_fraction=sum(migrated) / len(migrated) if migrated else None,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of a launched rank: ``python -m planner.runtime.train OPTIONS_JSON``."""
    args = sys.argv[1:] if argv is None else argv
    options = RunOptions.model_validate_json(args[0])
    results = run_rank(options, print_progress)
    if results is not None:
        write_record(options.results_path, results.model_dump_json(indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
