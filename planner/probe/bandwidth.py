"""nccl-tests' bandwidth conventions: the size S behind algbw and the bus-bandwidth factor per collective.

From ``NVIDIA/nccl-tests`` @ a0b82b22 (``src/*.cu``, ``XGetBw``; rationale in ``doc/PERFORMANCE.md``),
summarised in ``../shared/reference/ecosystem.md`` §4.1: ``algbw = S / t`` and ``busbw = algbw x factor``
with GB/s = 1e9 B/s and t the mean time per operation.

| collective      | S (bytes)                                   | busbw factor |
|-----------------|---------------------------------------------|--------------|
| all_reduce      | the buffer                                  | 2(n-1)/n     |
| all_gather      | the gathered output (n x per-rank input)    | (n-1)/n      |
| reduce_scatter  | the scattered input (n x per-rank output)   | (n-1)/n      |
| all_to_all      | one rank's whole send buffer                | (n-1)/n      |
| all_to_all_v    | the largest send buffer over ranks          | (n-1)/n      |
| send_recv       | the buffer                                  | 1            |

The cost model reads the same figures back (``planner/schema/hardware.py``):
``t = latency + S x factor / busbw``.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["BENCH_KINDS", "BenchKind", "algbw_gbps", "bus_factor", "busbw_gbps"]

BenchKind = Literal["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "all_to_all_v", "send_recv"]
BENCH_KINDS: tuple[BenchKind, ...] = (
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "all_to_all",
    "all_to_all_v",
    "send_recv",
)
"""What the probe times: the five collective kinds of a profile plus the uneven all-to-all (alltoallv)."""


def bus_factor(kind: BenchKind, n: int) -> float:
    """nccl-tests' busbw / algbw ratio for ``kind`` on ``n`` ranks."""
    if n < 2:
        raise ValueError(f"a collective needs at least 2 ranks, got {n}")
    if kind == "all_reduce":
        return 2 * (n - 1) / n
    if kind == "send_recv":
        return 1.0
    return (n - 1) / n


def algbw_gbps(size_bytes: float, seconds: float) -> float:
    """Algorithm bandwidth S / t in GB/s (1e9 B/s)."""
    return size_bytes / seconds / 1e9


def busbw_gbps(kind: BenchKind, n: int, size_bytes: float, seconds: float) -> float:
    """Bus bandwidth in GB/s: algbw times the collective's factor."""
    return algbw_gbps(size_bytes, seconds) * bus_factor(kind, n)
