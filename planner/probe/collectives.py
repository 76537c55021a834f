"""Collective microbenchmarks with torch.distributed, timed the way nccl-tests times them.

nccl-tests (``src/common.cu::BenchTime``, ``../shared/reference/ecosystem.md`` §4.1): warm-up
operations, then ``iters`` back-to-back operations, reported as the mean time per operation. Here the
same, with the per-rank mean reduced with MAX over every rank: the slowest rank is what a training step
waits for (nccl-tests averages ranks with ``-a 1``). All groups of a scope run at once, as
``NCCL_TESTS_SPLIT`` does, so groups that share a link (ranks of a node behind one NIC) share it as in
training. A mean over the whole batch rather than a per-operation statistic: concurrent groups do not
share a link fairly operation by operation (one runs ahead while the other waits), but over a batch
the slowest group finishes when the link has carried everyone's bytes.

Element type float32 (4 bytes) everywhere: gloo's CPU kernels and NCCL both support it, and bytes are
bytes for bandwidth. Sizes are nccl-tests' S per collective (``planner/probe/bandwidth.py``), rounded
down so that every rank's share is a whole number of elements.

Every decision about how many iterations and sizes to run is taken from figures that have already been
reduced across ranks, so all ranks take the same decision without extra messages: collectives must be
called in the same order on every rank.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from planner.probe.bandwidth import BenchKind, algbw_gbps, busbw_gbps
from planner.probe.results import Measurement, Scope

__all__ = ["GroupSet", "SeriesPlan", "group_sets", "measure_series", "size_for"]

ELEMENT_BYTES = 4
MIN_ITERATIONS = 3
MAX_ITERATIONS = 20
TARGET_POINT_S = 0.25
"""Timed seconds aimed at per size (iterations are chosen from one probing operation)."""
SIZE_STEP = 4
"""Sizes grow by 4x, like ``nccl-tests -f 4``."""
MIN_POINTS = 3
"""Sizes measured even when the budget is spent: an alpha-beta fit needs a few points."""


@dataclass(frozen=True)
class GroupSet:
    """The groups of one scope, and this rank's group in it (None if this rank is in none)."""

    scope: Scope
    group_size: int
    count: int
    mine: dist.ProcessGroup | None
    my_ranks: tuple[int, ...]
    """Global ranks of this rank's group, in group order."""


@dataclass(frozen=True)
class SeriesPlan:
    """Sizes to try for one (scope, collective): a ladder from ``min_bytes`` by 4x up to ``max_bytes``."""

    min_bytes: int
    max_bytes: int
    budget_s: float


def size_for(kind: BenchKind, nominal_bytes: int, n: int) -> int:
    """nccl-tests' S nearest below ``nominal_bytes`` that splits into whole elements per rank and peer."""
    unit = ELEMENT_BYTES if kind in ("all_reduce", "send_recv") else ELEMENT_BYTES * n
    if kind == "all_to_all_v":
        unit = ELEMENT_BYTES * _uneven_total_weight(n)
    return max(unit, nominal_bytes // unit * unit)


def _uneven_total_weight(n: int) -> int:
    """Sum of the uneven split weights 1..n (every rank sends and receives this many parts)."""
    return n * (n + 1) // 2


def _uneven_counts(me: int, n: int, part: int) -> list[int]:
    """alltoallv splits: rank ``me`` sends ``(1 + (me + j) mod n) * part`` elements to peer ``j``.

    Every row and every column is a permutation of 1..n, so all ranks send and receive the same total
    while each pair exchanges a different amount (the shape of a routed MoE dispatch)."""
    return [(1 + (me + j) % n) * part for j in range(n)]


def _make_op(kind: BenchKind, size: int, group: GroupSet, device: torch.device) -> Callable[[], None]:
    """One collective of nccl-tests size ``size`` on this rank's group, buffers allocated once."""
    n = group.group_size
    pg = group.mine
    me = group.my_ranks.index(dist.get_rank())
    elements = size // ELEMENT_BYTES
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

    def zeros(count: int) -> torch.Tensor:
        return torch.ones(count, dtype=torch.float32, device=device)

    if kind == "all_reduce":
        buf = zeros(elements)
        return lambda: dist.all_reduce(buf, group=pg)
    if kind == "all_gather":
        out, inp = zeros(elements), zeros(elements // n)
        return lambda: gather(out, inp, group=pg)
    if kind == "reduce_scatter":
        out, inp = zeros(elements // n), zeros(elements)
        return lambda: scatter(out, inp, group=pg)
    if kind == "all_to_all":
        out, inp = zeros(elements), zeros(elements)
        return lambda: dist.all_to_all_single(out, inp, group=pg)
    if kind == "all_to_all_v":
        part = elements // _uneven_total_weight(n)
        send = _uneven_counts(me, n, part)
        recv = [(1 + (j + me) % n) * part for j in range(n)]
        out, inp = zeros(sum(recv)), zeros(sum(send))
        return lambda: dist.all_to_all_single(
            out, inp, output_split_sizes=recv, input_split_sizes=send, group=pg
        )
    # send_recv: nccl-tests' ring, each rank sends to the next and receives from the previous at once.
    nxt, prv = group.my_ranks[(me + 1) % n], group.my_ranks[(me - 1) % n]
    out, inp = zeros(elements), zeros(elements)

    def ring() -> None:
        ops = [dist.P2POp(dist.isend, inp, nxt, group=pg), dist.P2POp(dist.irecv, out, prv, group=pg)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    return ring


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _slowest(seconds: float, device: torch.device) -> float:
    """The maximum of a per-rank figure over all ranks (every rank calls this)."""
    value = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())


def _timed(op: Callable[[], None] | None, iterations: int, device: torch.device) -> float:
    """Mean seconds per operation over ``iterations`` back-to-back ones (0 for a rank in no group)."""
    if op is None:
        return 0.0
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        op()
    _synchronize(device)
    return (time.perf_counter() - start) / iterations


def measure_series(
    kind: BenchKind, group: GroupSet, plan: SeriesPlan, device: torch.device
) -> list[Measurement]:
    """Time ``kind`` on every group of a scope at growing sizes until the plan's budget is spent (counted
    from rank-reduced times, so every rank stops at the same size).

    Every rank calls this, members of no group included (they still take part in the MAX reductions)."""
    points: list[Measurement] = []
    spent = 0.0
    nominal = plan.min_bytes
    while nominal <= plan.max_bytes:
        size = size_for(kind, nominal, group.group_size)
        op = _make_op(kind, size, group, device) if group.mine is not None else None
        # One warm-up operation (connection set-up, allocator), then one timed to choose the iterations.
        first = _slowest(_timed(op, 1, device), device)
        probe = _slowest(_timed(op, 1, device), device)
        iterations = max(MIN_ITERATIONS, min(MAX_ITERATIONS, int(TARGET_POINT_S / max(probe, 1e-9))))
        seconds = _slowest(_timed(op, iterations, device), device)
        del op
        points.append(
            Measurement(
                scope=group.scope,
                kind=kind,
                group_size=group.group_size,
                groups=group.count,
                size_bytes=size,
                seconds=seconds,
                iterations=iterations,
                algbw_gbps=algbw_gbps(size, seconds),
                busbw_gbps=busbw_gbps(kind, group.group_size, size, seconds),
            )
        )
        spent += first + probe + seconds * iterations
        predicted_next = SIZE_STEP * seconds * (2 + MIN_ITERATIONS)
        if len(points) >= MIN_POINTS and spent + predicted_next > plan.budget_s:
            break
        nominal *= SIZE_STEP
    return points


def group_sets(nodes: Sequence[Sequence[int]]) -> list[GroupSet]:
    """Create (collectively, on every rank) the groups of each scope that has at least 2 ranks."""
    me = dist.get_rank()
    per_node = len(nodes[0])
    sets: list[GroupSet] = []

    def scope(name: Scope, members: list[list[int]]) -> None:
        mine: dist.ProcessGroup | None = None
        my_ranks: tuple[int, ...] = ()
        for ranks in members:
            pg = dist.new_group(ranks=ranks)  # collective: every rank creates every group
            if me in ranks:
                mine, my_ranks = pg, tuple(ranks)
        sets.append(GroupSet(name, len(members[0]), len(members), mine, my_ranks))

    # Fast scopes first: they usually stop at max_bytes under their share, and what they leave over goes
    # to the slow inter-node series measured last (see the worker's budget split).
    if per_node >= 2:
        scope("intra_node", [list(ranks) for ranks in nodes])
    if len(nodes) >= 2:
        if per_node >= 2:
            scope("world", [sorted(r for node in nodes for r in node)])
        scope("inter_node", [[node[j] for node in nodes] for j in range(per_node)])
    return sets
