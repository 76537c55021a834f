"""``monta``: TP-duplicate dropping with a pipelined all-gather (MoNTA, arXiv 2411.00662; DeepSpeed PR
#5626 ``drop_tokens``/``gather_tokens``; ``EnflameTechnology/DeepSpeed`` commit ``f7336153``
``pipeline_alltoall_with_allgather``; seeds.md §1.1, §6.3).

With attention TP of size t and no sequence parallelism, the t TP ranks hold the same T tokens; TP rank
r sends only its ``1/t`` slice through the flat EP all-to-all, and an all-gather inside the TP group
(intra-node when TP is inside a node, as Megatron places it) rebuilds all T outputs. The combine is cut
into C chunks of the slice: every chunk's all-to-all is issued asynchronously up front (as DeepSpeed
does), and chunk c's all-gather is issued as soon as its all-to-all lands, so it runs while the
all-to-alls of chunks c+1.. are still in flight.

Bytes one rank sends per forward call, by :class:`TrafficMeter` kind (legend in the package docstring):
``dispatch = combine = the flat formula over T/t tokens`` (summed over the t TP peers: one duplicated
sender's bytes, i.e. 1/t of the undeduplicated total), ``all_gather = (t - 1) * T/t * H*b``,
``counts = (P - 1) * C * L * 8``. Backward: the transposed all-to-alls (``<kind>_backward``), and
``drop_backward`` for the all-gather of the token and weight gradients' slices.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from planner.runtime.dispatchers._collectives import (
    Comm,
    Pending,
    all_to_all,
    all_to_all_start,
    tp_drop,
    tp_gather_start,
)
from planner.runtime.dispatchers._routing import check_experts, flat_plan, run_experts, weighted_sum
from planner.runtime.dispatchers._setup import DispatcherSetup
from planner.runtime.meter import TrafficMeter
from planner.runtime.protocols import ExpertFn, TokenDispatcher
from planner.schema import ParallelConfig

__all__ = ["SENDS_TP_DUPLICATES", "MoNTADispatcher", "factory", "refuse"]

SENDS_TP_DUPLICATES = False
"""Without sequence parallelism TP ranks hold the same tokens: each token of a TP group is sent once: the duplicates are dropped."""


def _split_sizes(n: int, parts: int) -> list[int]:
    """``torch.tensor_split`` sizes: the first ``n % parts`` parts get one more."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


class MoNTADispatcher:
    """TP-duplicate dropping with a chunked all-to-all / all-gather pipeline (MoNTA); see the module docstring.

    Group layout. TP is innermost in Megatron's order: TP peers are consecutive ranks (``[0,1] [2,3] ...``
    for t = 2), on one node. MoNTA's layout (seeds.md §1.2) forms each EP group from the ranks with the
    *same TP rank*, e.g. world 8, t = 2: EP groups ``[0,2,4,6]`` and ``[1,3,5,7]``, so the EP all-to-all
    crosses nodes and the TP all-gather stays inside one; Megatron's expert grid with ETP = 1 instead
    takes contiguous EP groups (``[0,1,2,3] [4,5,6,7]``). Both work: the only requirement is that each EP
    group holds all E experts and that the TP peers hold the same tokens.

    Gradients. Token and weight gradients come out whole and identical on every TP rank (the
    TP-replicated convention of DeepSpeed's ``drop_tokens``/``gather_tokens``: the gradient of a dropped
    slice is all-gathered, that of a gathered result is sliced, never summed). Expert gradients: each
    token of a TP group reaches an expert once, so the expert gradients summed over all replicas of an
    expert (the expert data-parallel all-reduce) equal the single-process gradient once per TP group,
    whereas duplicated dispatch (every TP rank sends every token) gives t times it: a run loop that
    divides expert gradients by TP to undo the duplication must not do so with this dispatcher.

    Parameters
    ----------
    ep_group, tp_group
        This rank's EP group and TP group (created by the caller on every rank).
    num_experts
        E, divisible by the EP size.
    num_chunks
        C, the pipeline depth of the combine (DeepSpeed's ``shard_num``, default 4 there as here).
    meter
        Counts bytes and time (kinds ``dispatch``, ``combine``, ``counts``, ``all_gather``, and
        ``drop_backward`` for the all-gather of the token and weight gradients).
    """

    def __init__(
        self,
        ep_group: dist.ProcessGroup,
        tp_group: dist.ProcessGroup,
        num_experts: int,
        num_chunks: int = 4,
        meter: TrafficMeter | None = None,
    ) -> None:
        if num_chunks < 1:
            raise ValueError(f"num_chunks ({num_chunks}) must be >= 1")
        self._ep = Comm.of(ep_group, meter)
        self._tp = Comm.of(tp_group, meter)
        self.num_experts = num_experts
        self.num_local_experts = check_experts(num_experts, self._ep.size)
        self.num_chunks = num_chunks

    def __call__(self, tokens: Tensor, expert_ids: Tensor, weights: Tensor, experts: ExpertFn) -> Tensor:
        tp, ep, num_chunks = self._tp, self._ep, self.num_chunks
        slice_rows = _split_sizes(tokens.shape[0], tp.size)
        start, rows = sum(slice_rows[: tp.rank]), slice_rows[tp.rank]
        if tp.size > 1:
            tokens = tp_drop(tokens, slice_rows, tp)
            weights = tp_drop(weights, slice_rows, tp)
        expert_ids = expert_ids.narrow(0, start, rows)
        chunk_rows = [_split_sizes(n, num_chunks) for n in slice_rows]  # [TP rank][chunk]
        mine = chunk_rows[tp.rank]
        chunk_of_token = torch.repeat_interleave(
            torch.arange(num_chunks, device=tokens.device),
            torch.tensor(mine, device=tokens.device),
            output_size=rows,
        )
        plan = flat_plan(expert_ids, None, chunk_of_token, num_chunks, self.num_local_experts, ep)
        x_recv = all_to_all(
            tokens.index_select(0, plan.token_index), plan.recv_rows, plan.send_rows, ep, "dispatch"
        )
        y_recv = run_experts(x_recv, plan, experts)
        w_sent = weights.reshape(-1).index_select(0, plan.pair_index)

        # Rows of one chunk are contiguous per member on both sides: received rows are ordered (source,
        # chunk, local expert) and sent rows (destination, chunk, local expert).
        def blocks(x: Tensor, counts: list[list[list[int]]], chunk: int) -> Tensor:
            offsets = [0]
            for member in counts:
                offsets.append(offsets[-1] + sum(sum(c) for c in member))
            parts = [
                x.narrow(0, offsets[m] + sum(sum(c) for c in counts[m][:chunk]), sum(counts[m][chunk]))
                for m in range(len(counts))
            ]
            return torch.cat(parts)

        # Issue every chunk's combine all-to-all first, then gather chunk c while c+1.. are in flight.
        backs = [
            all_to_all_start(
                blocks(y_recv, plan.recv_counts, c),
                [sum(member[c]) for member in plan.send_counts],
                [sum(member[c]) for member in plan.recv_counts],
                ep,
                "combine",
            )
            for c in range(num_chunks)
        ]
        gathers: list[tuple[Tensor, ...]] = []
        gather_pending: list[Pending] = []
        for c, (back, pending) in enumerate(backs):
            pending.wait()
            token = blocks(plan.token_index, plan.send_counts, c) - sum(mine[:c])
            out_c = weighted_sum(back, token, blocks(w_sent, plan.send_counts, c), mine[c])
            if tp.size == 1:
                gathers.append((out_c,))
                continue
            rows_c = [chunk_rows[q][c] for q in range(tp.size)]
            gathers.append(tp_gather_start(out_c, rows_c, tp, "all_gather", gather_pending))
        for pending in gather_pending:
            pending.wait()
        for pending in [p for _, p in backs] + gather_pending:
            pending.flush()
        return torch.cat(
            [gathers[c][q][: chunk_rows[q][c]] for q in range(tp.size) for c in range(num_chunks)]
        )


def refuse(parallel: ParallelConfig) -> str | None:
    """MoNTA removes the duplicate tokens of TP ranks: it has none to remove under sequence parallelism,
    and its all-gather inside the TP group is not composed with expert tensor parallelism here."""
    if parallel.etp > 1:
        return (
            "the monta dispatcher with etp > 1 is not implemented: run monta with --etp 1, or another "
            "dispatcher"
        )
    if parallel.sequence_parallel and parallel.tp > 1:
        return (
            "the monta dispatcher removes the tokens TP ranks hold twice, and sequence parallelism leaves "
            "none: run monta with --no-sequence-parallel, or another dispatcher"
        )
    return None


def factory(setup: DispatcherSetup) -> Callable[[int], TokenDispatcher]:
    """One :class:`MoNTADispatcher` per layer over this rank's EP and TP groups, with the plan's chunks.
    Also with an EP group of one: the TP duplicates are still removed (each token reaches the experts
    once per TP group, which the run loop's expert-gradient scaling counts on)."""
    ep_group, tp_group = setup.groups["ep"], setup.groups["tp"]
    experts, meter, chunks = setup.num_experts, setup.meter, setup.parallel.dispatcher.num_chunks

    def build(_layer: int) -> TokenDispatcher:
        return MoNTADispatcher(ep_group, tp_group, experts, num_chunks=chunks, meter=meter)

    return build
