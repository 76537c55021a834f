"""Admissible bounds on a layout's step time and memory, used to prune the search before any ILP.

No PuLP here: a search that prunes every layout (a model that fits nowhere) never imports it.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator

from planner.costmodel.estimate import LayoutCosts
from planner.costmodel.memory import MemoryCoefficients
from planner.schema import ModelSpec
from planner.units import GIB

__all__ = [
    "TIE_TOLERANCE",
    "average_bound",
    "in_bound_order",
    "lower_bound",
    "memory_floor",
    "memory_lower_bound",
    "memory_may_fit",
    "time_floors",
]

MEMORY_SLACK = 1e-3
"""Relative capacity ``memory_may_fit`` adds: far above the bytes the ILP's tolerances (integrality 1e-6,
rows 1e-7 GiB) can hide, so a layout the ILP would call feasible is never discarded."""
MEMORY_DP_LIMIT = 100_000
"""Steps of ``memory_may_fit``'s dynamic programme beyond which it answers True without trying."""
TIE_TOLERANCE = 1e-9
"""Relative difference in step time below which two plans are ties (the search's tie rule). Far above
the rounding of ``evaluate``'s sums (about 1e-15), far below any difference a plan's choice should
rest on (a nanosecond per second of step)."""


def memory_lower_bound(costs: LayoutCosts) -> float:
    """Bytes the busiest rank needs at least, whatever the stage assignment (see ``memory_floor``)."""
    return memory_floor(costs.memory, costs.context.model)


def memory_floor(mem: MemoryCoefficients, model: ModelSpec) -> float:
    """Bytes the busiest rank needs at least, whatever the stage assignment: the average rank's.

    Every rank holds at least one in-flight micro-batch of its layers; the state and activations of
    all layers spread over pp ranks at best evenly, so the busiest holds at least the average.
    """
    pp = len(mem.in_flight)
    least = min(mem.in_flight)
    layers = model.num_dense_layers * (sum(mem.dense_layer_state) + least * mem.dense_layer_activations)
    layers += model.num_moe_layers * (sum(mem.moe_layer_state) + least * mem.moe_layer_activations)
    edges = sum(mem.first_rank_state) + sum(mem.last_rank_state) + mem.logits
    return (layers + edges) / pp + mem.recompute_workspace + mem.dispatch_buffers + mem.reserve


def memory_may_fit(costs: LayoutCosts) -> bool:
    """False only when no stage assignment of this layout fits in memory: the ILP's memory rows (bytes of
    each rank, linear in its dense and MoE layers) relaxed to whole layers per rank, with the chunks'
    order and minimum sizes dropped, and the capacity raised by ``MEMORY_SLACK``.

    A dynamic programme over ranks: for each count of the less numerous kind placed so far, the most
    layers of the other kind the ranks can hold. The ILP would prove the same infeasibility, slowly.
    """
    mem, model = costs.memory, costs.context.model
    pp = len(mem.in_flight)
    room = costs.context.cluster.gpu.hbm_gib * GIB * (1 + MEMORY_SLACK)
    kinds = [
        (model.num_dense_layers, sum(mem.dense_layer_state), mem.dense_layer_activations),
        (model.num_moe_layers, sum(mem.moe_layer_state), mem.moe_layer_activations),
    ]
    (few, few_state, few_act), (many, many_state, many_act) = sorted(kinds, key=lambda kind: kind[0])
    if pp * (few + 1) ** 2 > MEMORY_DP_LIMIT:
        return True
    most = [0] + [-1] * few
    """most[k]: the most layers of the numerous kind the ranks so far hold beside k of the other (-1: none)."""
    for rank in range(pp):
        fixed = mem.recompute_workspace + mem.dispatch_buffers + mem.reserve
        if rank == 0:
            fixed += sum(mem.first_rank_state)
        if rank == pp - 1:
            fixed += sum(mem.last_rank_state) + mem.logits
        few_bytes = few_state + mem.in_flight[rank] * few_act
        many_bytes = many_state + mem.in_flight[rank] * many_act
        step = [-1] * (few + 1)
        for placed, held in enumerate(most):
            if held < 0:
                continue
            for extra in range(few - placed + 1):
                left = room - fixed - few_bytes * extra
                if left < 0:
                    break
                fit = many if many_bytes <= 0 else min(many, int(left // many_bytes))
                step[placed + extra] = max(step[placed + extra], min(many, held + fit))
        most = step
    return most[few] >= many


def _min_max(lo: int, hi: int, rising: Callable[[int], float], falling: Callable[[int], float]) -> float:
    """``min over lo <= n <= hi of max(rising(n), falling(n))`` for a non-decreasing and a non-increasing
    function, by bisection for the first n where rising overtakes falling."""
    a, b = lo, hi + 1
    while a < b:
        mid = (a + b) // 2
        if rising(mid) >= falling(mid):
            b = mid
        else:
            a = mid + 1
    if a > hi:
        return falling(hi)
    return rising(a) if a == lo else min(rising(a), falling(a - 1))


def _average_floors(costs: LayoutCosts) -> tuple[float, float]:
    """The average part of ``time_floors``: all layers and the output layer spread evenly over the pp
    ranks and the pp * vpp chunks."""
    p, model = costs.context.parallel, costs.context.model
    layers = model.num_dense_layers * costs.dense_s + model.num_moe_layers * costs.moe_s
    t = (layers + costs.head_s) / p.pp + costs.p2p_s
    u = (layers + costs.head_s) / (p.pp * p.vpp) + costs.p2p_s / p.vpp
    return t, u


def time_floors(costs: LayoutCosts) -> tuple[float, float]:
    """Seconds per micro-batch that the busiest rank and the largest chunk take at least, whatever the
    stage assignment (memory ignored): the ILP's T and U cannot go below them.

    Each is the larger of two bounds. The average: all layers (and the output layer) spread evenly
    over pp ranks or pp * vpp chunks. Integrality: layers are whole, so with n layers on the last rank
    (chunk), which also holds the output layer, some other rank (chunk) holds at least
    ceil((L - n) / (pp - 1)) of the L layers (every rank at least vpp, every chunk at least one); the
    lightest layers of those counts bound their times, and minimising over n bounds the maximum. The
    last chunk holds the model's last n layers, so its time is exact in n.
    """
    p = costs.context.parallel
    model = costs.context.model
    num_dense, num_moe = model.num_dense_layers, model.num_moe_layers
    total = num_dense + num_moe
    light, heavy = sorted(((costs.dense_s, num_dense), (costs.moe_s, num_moe)), key=lambda kind: kind[0])

    def lightest(n: int) -> float:
        """Seconds of the n lightest layers of the model."""
        first = min(n, light[1])
        return first * light[0] + (n - first) * heavy[0]

    def last_layers(n: int) -> float:
        """Seconds of the model's last n layers (MoE layers come last)."""
        moe = min(n, num_moe)
        return moe * costs.moe_s + (n - moe) * costs.dense_s

    chunks = p.pp * p.vpp
    t, u = _average_floors(costs)
    if p.pp > 1 and total >= chunks:
        t = max(t, _min_max(
            p.vpp,
            total - (p.pp - 1) * p.vpp,
            lambda n: costs.head_s + costs.p2p_s + lightest(n),
            lambda n: costs.p2p_s + lightest(max(p.vpp, -(-(total - n) // (p.pp - 1)))),
        ))  # fmt: skip
    if chunks > 1 and total >= chunks:
        u = max(u, _min_max(
            1,
            total - (chunks - 1),
            lambda n: costs.head_s + costs.p2p_s / p.vpp + last_layers(n),
            lambda n: costs.p2p_s / p.vpp + lightest(-(-(total - n) // (chunks - 1))),
        ))  # fmt: skip
    return t, u


def average_bound(costs: LayoutCosts) -> float:
    """A cheap bound no greater than ``lower_bound``: the step time at the average floors, without the
    data-parallel terms. ``lower_bound`` takes the same steps from larger floors and adds a non-negative
    term, and floating-point products and sums are monotone, so the order holds exactly."""
    t, u = _average_floors(costs)
    return costs.num_microbatches * t + costs.bubble * u


def in_bound_order(costs: dict[int, LayoutCosts]) -> Iterator[tuple[float, int]]:
    """``(lower_bound, index)`` of every layout, in the order ``sorted`` gives them (ties by index),
    computing ``lower_bound`` only for the layouts reached: each waits in a heap under its
    ``average_bound`` and is bounded exactly when it comes to the top, so a layout is yielded only once
    every other layout's key, a lower bound on its own bound, is no smaller."""
    heap = [(average_bound(c), index, False) for index, c in costs.items()]
    heapq.heapify(heap)
    while heap:
        bound, index, exact = heapq.heappop(heap)
        if exact:
            yield bound, index
        else:
            heapq.heappush(heap, (lower_bound(costs[index]), index, True))


def lower_bound(costs: LayoutCosts) -> float:
    """A bound no stage assignment of this layout beats (memory ignored).

    The busiest rank and the largest chunk take at least ``time_floors``. The step time is
    non-decreasing in both (the rank time's slope m is at least the data-parallel slopes' sum), so
    evaluating it at these floors is a valid lower bound.
    """
    t, u = time_floors(costs)
    exposed = sum(max(0.0, term.total_s - term.slope * t) for term in costs.data_parallel)
    return costs.num_microbatches * t + costs.bubble * u + exposed
