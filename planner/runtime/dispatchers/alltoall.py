"""``alltoall``: the flat expert-parallel all-to-all (Megatron-Core ``MoEAlltoAllTokenDispatcher``,
``megatron/core/transformer/moe/token_dispatcher.py``; DeepSpeed/GShard).

Exchange the per-(member, local expert) counts (an equal-split all-to-all of int64), then one all-to-all
with uneven splits carrying one row per (token, expert) pair, regroup by local expert, run the experts,
send the rows back with the inverse all-to-all, weight and sum at home. Optional capacity: per source
rank and expert, the first ``ceil(capacity_factor * T*K / E)`` pairs in token order are kept (Megatron's
``get_capacity`` with the "position" drop policy); dropped pairs contribute zero.

Bytes one rank sends per forward call, by :class:`TrafficMeter` kind (legend in the package docstring):
``dispatch = combine = sum over kept pairs whose member != me of H*b`` (split by the member's node),
``counts = (P - 1) * L * 8``. Backward: ``dispatch_backward`` bytes are the ``combine`` bytes and
``combine_backward`` the ``dispatch`` bytes (a rank sends back the gradients of what it received).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist
from torch import Tensor

from planner.runtime.dispatchers._collectives import Comm, all_to_all
from planner.runtime.dispatchers._local import local_factory
from planner.runtime.dispatchers._routing import (
    capacity_keep_mask,
    check_experts,
    flat_plan,
    run_experts,
    weighted_sum,
)
from planner.runtime.dispatchers._setup import DispatcherSetup
from planner.runtime.meter import TrafficMeter
from planner.runtime.protocols import ExpertFn, TokenDispatcher
from planner.schema import ParallelConfig

__all__ = ["SENDS_TP_DUPLICATES", "AllToAllDispatcher", "factory", "refuse"]

SENDS_TP_DUPLICATES = True
"""Without sequence parallelism TP ranks hold the same tokens: every TP rank sends its copy of a duplicated token."""


class AllToAllDispatcher:
    """Flat expert-parallel all-to-all: one row per (token, expert) pair; see the module docstring.

    Parameters
    ----------
    ep_group
        The EP process group (``dist.group.WORLD`` for all ranks); its members' global ranks are read
        with ``dist.get_process_group_ranks``.
    num_experts
        E, divisible by the EP size.
    meter
        Counts the bytes and time of each collective (kinds ``dispatch``, ``combine``, ``counts``).
    capacity_factor
        ``None`` for dropless, otherwise the per-expert capacity factor (``capacity_keep_mask``).
    """

    def __init__(
        self,
        ep_group: dist.ProcessGroup,
        num_experts: int,
        meter: TrafficMeter | None = None,
        capacity_factor: float | None = None,
    ) -> None:
        self._ep = Comm.of(ep_group, meter)
        self.num_experts = num_experts
        self.num_local_experts = check_experts(num_experts, self._ep.size)
        self.capacity_factor = capacity_factor

    def __call__(self, tokens: Tensor, expert_ids: Tensor, weights: Tensor, experts: ExpertFn) -> Tensor:
        keep = None
        if self.capacity_factor is not None:
            keep = capacity_keep_mask(expert_ids, self.num_experts, self.capacity_factor)
        plan = flat_plan(expert_ids, keep, None, 1, self.num_local_experts, self._ep)
        send, recv = plan.send_rows, plan.recv_rows
        x_recv = all_to_all(tokens.index_select(0, plan.token_index), recv, send, self._ep, "dispatch")
        y_recv = run_experts(x_recv, plan, experts)
        y_back = all_to_all(y_recv, send, recv, self._ep, "combine")
        return weighted_sum(y_back, plan.token_index, weights.reshape(-1)[plan.pair_index], tokens.shape[0])


def refuse(parallel: ParallelConfig) -> str | None:
    """The flat all-to-all runs every layout the run loop builds."""
    return None


def factory(setup: DispatcherSetup) -> Callable[[int], TokenDispatcher]:
    """One :class:`AllToAllDispatcher` per layer over this rank's EP group (local with an EP group of one)."""
    if setup.parallel.ep == 1:
        return local_factory(setup.num_experts)
    ep_group, experts, meter = setup.groups["ep"], setup.num_experts, setup.meter

    def build(_layer: int) -> TokenDispatcher:
        return AllToAllDispatcher(ep_group, experts, meter=meter)

    return build
