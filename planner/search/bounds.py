"""Admissible bounds on a layout's step time and memory, used to prune the search before any ILP.

No PuLP here: a search that prunes every layout (a model that fits nowhere) never imports it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Iterator

from planner.costmodel.estimate import LayoutCosts
from planner.costmodel.memory import MemoryCoefficients
from planner.costmodel.optimizer import OptimizerRates
from planner.schema import ModelSpec, ParallelConfig

__all__ = [
    "TIE_TOLERANCE",
    "average_bound",
    "host_floor",
    "in_bound_order",
    "lower_bound",
    "memory_bound",
    "memory_floor",
    "memory_lower_bound",
    "memory_may_fit",
    "optimizer_floor",
    "optimizer_floor_bytes",
    "rank_bytes",
    "time_floors",
]

_WAITING, _CHEAP, _EXACT = 0, 1, 2
"""States of a layout in ``in_bound_order``'s heap."""
MEMORY_SLACK = 1e-3
"""Relative capacity ``memory_bound`` adds: far above the bytes the ILP's tolerances (integrality 1e-6,
rows 1e-7 GiB) can hide, so a layout the ILP would call feasible is never discarded."""
MEMORY_DP_LIMIT = 100_000
"""Steps of ``memory_bound``'s dynamic programme beyond which it leaves memory out."""
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
    edges = sum(mem.first_rank_state) + sum(mem.last_rank_state) + mem.logits + mem.mtp_activations
    return (layers + edges) / pp + mem.fixed_bytes


def host_floor(mem: MemoryCoefficients, model: ModelSpec) -> float:
    """Host bytes of offloaded optimizer state the busiest rank holds at least: the average rank's."""
    pp = len(mem.in_flight)
    dense, moe = mem.host_per_layer
    total = model.num_dense_layers * dense + model.num_moe_layers * moe + sum(mem.host_edges)
    return total / pp


def optimizer_floor_bytes(mem: MemoryCoefficients, model: ModelSpec) -> float:
    """GPU optimizer-state bytes of the average rank (part of ``memory_floor``)."""
    pp = len(mem.in_flight)
    gpu = model.num_dense_layers * mem.dense_layer_state[2] + model.num_moe_layers * mem.moe_layer_state[2]
    return (gpu + mem.first_rank_state[2] + mem.last_rank_state[2]) / pp


def optimizer_floor(mem: MemoryCoefficients, model: ModelSpec, rates: OptimizerRates) -> float:
    """Seconds the optimizer step takes at least: that of the average rank's state (the step waits for
    the busiest rank's, ``ilp.add_memory_and_optimizer``)."""
    return rates.seconds(optimizer_floor_bytes(mem, model), host_floor(mem, model))


def rank_bytes(mem: MemoryCoefficients, rank: int) -> tuple[float, float, float]:
    """(bytes per dense layer, bytes per MoE layer, fixed bytes) of pipeline rank ``rank``: its memory is
    linear in the layers it holds (the ILP's memory rows, ``ilp.add_memory_and_optimizer``)."""
    in_flight = mem.in_flight[rank]
    dense = sum(mem.dense_layer_state) + in_flight * mem.dense_layer_activations
    moe = sum(mem.moe_layer_state) + in_flight * mem.moe_layer_activations
    fixed = mem.fixed_bytes
    if rank == 0:
        fixed += sum(mem.first_rank_state)
    if rank == len(mem.in_flight) - 1:
        fixed += sum(mem.last_rank_state) + mem.logits + mem.mtp_activations
    return dense, moe, fixed


class _Placement:
    """Whether the layers can go to ranks so that each rank fits in memory and takes at most given seconds
    per micro-batch: the ILP's memory and rank-time rows relaxed to whole layers per rank (the chunks'
    order and minimum sizes dropped), the capacity raised by ``MEMORY_SLACK``.

    A dynamic programme over ranks: for each count of the less numerous kind of layer placed so far, the
    most layers of the other kind the ranks can hold."""

    def __init__(self, costs: LayoutCosts, capacity: float) -> None:
        model, mem = costs.context.model, costs.memory
        last = len(mem.in_flight) - 1
        dense_few = model.num_dense_layers <= model.num_moe_layers
        self.few, self.many = sorted((model.num_dense_layers, model.num_moe_layers))
        self.few_s, self.many_s = (costs.dense_s, costs.moe_s) if dense_few else (costs.moe_s, costs.dense_s)
        self.ranks = []
        """Per rank: (bytes left for layers, bytes per layer of the few, of the many, fixed seconds)."""
        for rank in range(last + 1):
            dense, moe, fixed = rank_bytes(mem, rank)
            few, many = (dense, moe) if dense_few else (moe, dense)
            seconds = costs.p2p_s + (costs.head_s if rank == last else 0.0)
            self.ranks.append((capacity * (1 + MEMORY_SLACK) - fixed, few, many, seconds))
        self.tractable = len(self.ranks) * (self.few + 1) ** 2 <= MEMORY_DP_LIMIT

    def possible(self, seconds: float) -> bool:
        # Times within a relative 1e-12 count as equal: the rank times here and in evaluate() are the
        # same products summed in another order.
        limit, timed = seconds * (1 + 1e-12), math.isfinite(seconds)
        few, many, few_s, many_s = self.few, self.many, self.few_s, self.many_s
        most = [0] + [-1] * few
        """most[k]: the most layers of the many the ranks so far hold beside k of the few (-1: none)."""
        for room, few_bytes, many_bytes, fixed_s in self.ranks:
            step = [-1] * (few + 1)
            for placed, held in enumerate(most):
                if held < 0:
                    continue
                for extra in range(few - placed + 1):
                    left, time_left = room - few_bytes * extra, limit - fixed_s - few_s * extra
                    if left < 0 or time_left < 0:
                        break
                    fit = many if many_bytes <= 0 else int(left // many_bytes)
                    if many_s > 0 and timed:
                        fit = min(fit, int(time_left // many_s))
                    step[placed + extra] = max(step[placed + extra], min(many, held + fit))
            most = step
        return most[few] >= many

    def rank_seconds(self) -> list[float]:
        """Every time a rank can take, ascending: the relaxed optimum is one of them."""
        fixed = {seconds for *_, seconds in self.ranks}
        return sorted({f + x * self.few_s + y * self.many_s for f in fixed for x in range(self.few + 1)
                       for y in range(self.many + 1)})  # fmt: skip


def memory_may_fit(costs: LayoutCosts, capacity: float) -> bool:
    """False only when no stage assignment of this layout fits in ``capacity`` bytes per GPU (the ILP
    would prove it infeasible); see ``memory_bound``."""
    placement = _Placement(costs, capacity)
    return not placement.tractable or placement.possible(math.inf)


def memory_bound(costs: LayoutCosts, capacity: float) -> float:
    """``lower_bound`` with memory: no stage assignment that fits in ``capacity`` bytes per GPU beats it
    (``math.inf`` when none fits).

    The busiest rank takes at least the least time T at which the layers can be placed on the ranks with
    each rank in memory and within T (``_Placement``, a relaxation of the ILP's rows, so the least T is
    at most the ILP's); where memory forces layers off some ranks this is well above ``time_floors``.
    The step time at that floor is a valid bound for the reason ``lower_bound`` gives.
    """
    t, u = time_floors(costs)
    placement = _Placement(costs, capacity)
    if not placement.tractable:
        return _step_at(costs, t, u)
    if not placement.possible(math.inf):
        return math.inf
    if not placement.possible(t):
        # The least rank time above t that is possible (the largest always is); relaxed by the same
        # 1e-12 so that it stays below the rank time evaluate() computes for the same layers.
        times = [s for s in placement.rank_seconds() if s > t]
        lo, hi = 0, len(times) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if placement.possible(times[mid]):
                hi = mid
            else:
                lo = mid + 1
        t = max(t, times[lo] * (1 - 1e-12))
    return _step_at(costs, t, u)


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


def _average_floors(
    model: ModelSpec, p: ParallelConfig, dense_s: float, moe_s: float, head_s: float, p2p_s: float
) -> tuple[float, float]:
    """The average part of ``time_floors``: all layers and the output layer spread evenly over the pp
    ranks and the pp * vpp chunks."""
    layers = model.num_dense_layers * dense_s + model.num_moe_layers * moe_s
    t = (layers + head_s) / p.pp + p2p_s
    u = (layers + head_s) / (p.pp * p.vpp) + p2p_s / p.vpp
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
    t, u = _average_floors(model, p, costs.dense_s, costs.moe_s, costs.head_s, costs.p2p_s)
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


def average_bound(
    model: ModelSpec,
    parallel: ParallelConfig,
    seconds: tuple[float, float, float, float],
    num_microbatches: int,
) -> float:
    """A cheap bound no greater than ``lower_bound``, from ``estimate.layer_seconds`` and the micro-batch
    count alone: the step time at the average floors, without the data-parallel terms. ``lower_bound``
    takes the same steps from larger floors and adds a non-negative term, and floating-point products
    and sums are monotone, so the order holds exactly."""
    t, u = _average_floors(model, parallel, *seconds)
    return num_microbatches * t + float(parallel.pp - 1) * u


def in_bound_order(
    cheap: Iterable[tuple[float, int]],
    bound: Callable[[int], float],
    waiting: Iterable[tuple[float, int]] = (),
    expand: Callable[[int], Iterable[tuple[float, int]]] | None = None,
) -> Iterator[tuple[float, int]]:
    """``(bound(index), index)`` of every layout of ``cheap``, in the order ``sorted`` gives them (ties by
    index), computing ``bound`` only for the layouts reached: each waits in a heap under its ``cheap``
    key (no greater than its bound) and is bounded exactly when it comes to the top, so a layout is
    yielded only once every other layout's key, a lower bound on its own bound, is no smaller.

    ``waiting`` holds layouts that stand for others not made yet, each under a key no greater than theirs:
    when one comes to the top, ``expand`` makes them, and they wait under their own cheap keys."""
    heap = [(key, index, _CHEAP) for key, index in cheap]
    heap += [(key, index, _WAITING) for key, index in waiting]
    heapq.heapify(heap)
    while heap:
        key, index, state = heapq.heappop(heap)
        if state == _EXACT:
            yield key, index
        elif state == _CHEAP:
            heapq.heappush(heap, (bound(index), index, _EXACT))
        else:
            assert expand is not None
            for item in expand(index):
                heapq.heappush(heap, (*item, _CHEAP))


def lower_bound(costs: LayoutCosts) -> float:
    """A bound no stage assignment of this layout beats (memory ignored).

    The busiest rank and the largest chunk take at least ``time_floors``. The step time is
    non-decreasing in both (the rank time's slope m is at least the data-parallel slopes' sum), so
    evaluating it at these floors is a valid lower bound; the optimizer step adds at least
    ``optimizer_floor``.
    """
    return _step_at(costs, *time_floors(costs))


def _step_at(costs: LayoutCosts, t: float, u: float) -> float:
    """The step time with the busiest rank at ``t`` and the largest chunk at ``u`` seconds per micro-batch,
    the optimizer step at its ``optimizer_floor``."""
    exposed = sum(max(0.0, term.total_s - term.slope * t) for term in costs.data_parallel)
    floor = optimizer_floor(costs.memory, costs.context.model, costs.optimizer_rates)
    return costs.num_microbatches * t + costs.bubble * u + exposed + floor
