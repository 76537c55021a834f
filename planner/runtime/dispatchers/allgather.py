"""``allgather``: Megatron-Core's all-gather token dispatcher (``MoEAllGatherTokenDispatcher``,
``megatron/core/transformer/moe/token_dispatcher.py``) over this rank's EP group.

Every member all-gathers the tokens ``[T_i, H]`` of every member of its EP group with their expert ids
and combine weights. The counts ``T_i`` may differ (condensation, uneven batches): they are all-gathered
first, and every member's rows are padded to ``T_max = max_i T_i`` because the list form of
``all_gather`` needs equal shapes. Each member runs its local experts on the gathered rows routed to
them, weights the outputs and sums them per gathered row (zero where it holds none of the row's
experts), and a reduce-scatter returns to each member the sum over the members of its own rows. gloo has
no reduce-scatter: it is an uneven all-to-all of the row blocks followed by a local sum over the P
received blocks (in member order), as expert tensor parallelism does it. Autograd: the all-gather's
backward is the reduce-scatter of the gradients, the reduce-scatter's backward the all-gather.

Megatron gathers over the expert-tensor x expert-parallel group (ETP x EP) and sends a dense ``[T, E]``
routing map and probabilities; here ETP is 1 (refused otherwise) and the routing travels as K int32
expert ids and K combine weights per token.

Bytes one rank sends per forward call, by :class:`TrafficMeter` kind (legend in the package docstring;
``T_max = max_i T_i`` over the EP group)::

    counts   = (P - 1) * 8                                   (its token count, int64, to every member)
    dispatch = (P - 1) * T_max * (H*b + K*(4 + b_w))         (tokens, expert ids, weights, padded)
    combine  = sum over members i != me of T_i * H*b         (member i's rows of its partial sums)

split by the destination's node: the dispatch sends the same to every other member, G - 1 of them on
its node and P - G elsewhere. Backward: ``combine_backward = (P - 1) * T_max * H*b`` (the all-gather
of the output gradients, padded) and ``dispatch_backward = sum over i != me of T_i * (H*b + K*b_w)``
(the reduce-scatter of the token and weight gradients; the ids have none).

Against the cost model, which prices this dispatcher at (P - 1) copies of each token per direction for
TP 1 (``planner/costmodel/dispatchers/allgather.py``): the hidden-vector bytes match it exactly when
every member has the same T (dispatch and combine are each ``(P - 1) * T * H*b`` per rank). With uneven
counts the padding adds ``(P - 1) * (T_max - T_me) * H*b`` to a rank's dispatch, and the combine sends
the other members' counts (summed over the group it is exactly P - 1 copies of every token). The
routing metadata, ``(P - 1) * T_max * K*(4 + b_w)``, and the counts, ``(P - 1) * 8``, are not priced
there.

The meter counts an all-gather as sends to every member. gloo (and NCCL) run it as a ring, which crosses
between nodes on fewer hops: on the emulated cluster (2 nodes x 2 ranks, ``benchmarks/dispatch_traffic.py``)
the interfaces carried 141 MiB where the meter counted 161 MiB (0.88; the all-gather part alone 3/4).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from planner.runtime.dispatchers._collectives import Comm, all_gather_rows, reduce_scatter_rows
from planner.runtime.dispatchers._local import local_factory
from planner.runtime.dispatchers._routing import check_experts, weighted_sum
from planner.runtime.dispatchers._setup import DispatcherSetup
from planner.runtime.meter import TrafficMeter
from planner.runtime.protocols import ExpertFn, TokenDispatcher
from planner.schema import ParallelConfig

__all__ = ["SENDS_TP_DUPLICATES", "AllGatherDispatcher", "factory", "refuse"]

SENDS_TP_DUPLICATES = True
"""Without sequence parallelism TP ranks hold the same tokens: every TP rank's copy of a duplicated token is gathered."""


class AllGatherDispatcher:
    """All-gather every member's tokens, run the local experts on them, reduce-scatter the outputs home;
    see the module docstring.

    Parameters
    ----------
    ep_group
        This rank's EP process group (created by the caller on every rank).
    num_experts
        E, divisible by the EP size.
    meter
        Counts the bytes and time of each collective (kinds ``counts``, ``dispatch`` for the tokens and
        their routing, ``combine`` for the reduce-scatter).
    """

    def __init__(
        self, ep_group: dist.ProcessGroup, num_experts: int, meter: TrafficMeter | None = None
    ) -> None:
        self._ep = Comm.of(ep_group, meter)
        self.num_experts = num_experts
        self.num_local_experts = check_experts(num_experts, self._ep.size)

    def __call__(self, tokens: Tensor, expert_ids: Tensor, weights: Tensor, experts: ExpertFn) -> Tensor:
        ep, per_member = self._ep, self.num_local_experts
        count = torch.tensor([tokens.shape[0]], dtype=torch.int64, device=tokens.device)
        # The one device->host copy of the call: the gathers' and the reduce-scatter's split sizes.
        rows: list[int] = all_gather_rows(count, [1] * ep.size, ep, "counts").tolist()
        x = all_gather_rows(tokens, rows, ep, "dispatch")
        ids = all_gather_rows(expert_ids.to(torch.int32), rows, ep, "dispatch")
        w = all_gather_rows(weights, rows, ep, "dispatch")
        # This member's (row, slot) pairs among the gathered rows, grouped by local expert (row order
        # kept within an expert).
        local_ids = ids.long() - ep.rank * per_member
        row, slot = ((local_ids >= 0) & (local_ids < per_member)).nonzero(as_tuple=True)
        local = local_ids[row, slot]
        order = torch.argsort(local, stable=True)
        row, slot, local = row[order], slot[order], local[order]
        counts = torch.bincount(local, minlength=per_member).tolist()
        y = experts(x.index_select(0, row), counts)
        partial = weighted_sum(y, row, w[row, slot], x.shape[0])
        return reduce_scatter_rows(partial, rows, ep, "combine")


def refuse(parallel: ParallelConfig) -> str | None:
    """What the bundled all-gather dispatcher does not implement."""
    if parallel.etp > 1:
        return (
            "the allgather dispatcher with etp > 1 is not implemented: Megatron's gathers over the expert "
            "tensor x expert parallel group, the bundled runtime's over the EP group only; run allgather "
            "with --etp 1, or another dispatcher"
        )
    return None


def factory(setup: DispatcherSetup) -> Callable[[int], TokenDispatcher]:
    """One :class:`AllGatherDispatcher` per layer over this rank's EP group (local with an EP group of
    one: gathering over one member is the local computation)."""
    if setup.parallel.ep == 1:
        return local_factory(setup.num_experts)
    ep_group, experts, meter = setup.groups["ep"], setup.num_experts, setup.meter

    def build(_layer: int) -> TokenDispatcher:
        return AllGatherDispatcher(ep_group, experts, meter=meter)

    return build
