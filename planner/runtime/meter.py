"""Per-rank communication accounting: the bytes this rank sends, per link class and collective kind.

What a rank puts on the wire is the measurable side of the cost model's volume formulas
(``../shared/reference/seeds.md`` §6.2-6.3), so the meter counts exactly that and nothing else:

- **bytes sent by this rank**, split by destination: ``intra_node`` when the destination global rank is on
  this rank's node, ``inter_node`` otherwise, with ``node_of(rank) = rank // ranks_per_node`` (ranks are
  placed node-contiguously, as torchrun and Slurm number them). Bytes a rank "sends" to itself are not
  counted: they never cross a link (an all-to-all's own split is a local copy).
- **per collective kind** (free-form names chosen by the caller: ``"dispatch"``, ``"combine"``,
  ``"counts"``, ``"all_gather"``, and ``"<kind>_backward"`` for the gradients' collectives).
- **wall-clock seconds per kind** and the number of timed calls. The caller brackets each collective
  with :meth:`TrafficMeter.timed` and passes a ``synchronize`` callable (``torch.cuda.synchronize`` on
  GPUs) so that asynchronous device work is inside the interval. Intervals of overlapped collectives
  overlap, so per-kind seconds may sum to more than the elapsed time.

The byte count is the payload (elements x element size), the quantity nccl-tests calls the algorithm
size; a ring or tree implementation may forward some bytes more than once, which the cost model
accounts for through its bus-bandwidth factors, not here.

Torch-free (standard library only), so the run loop and the probe can use it for any collective.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final, TypedDict

__all__ = [
    "INTER_NODE",
    "INTRA_NODE",
    "LINK_CLASSES",
    "KindTraffic",
    "TrafficMeter",
    "TrafficSnapshot",
    "link_class",
    "node_of",
]

INTRA_NODE: Final = "intra_node"
"""Link class of a destination on the sender's node (NVLink / shared memory)."""
INTER_NODE: Final = "inter_node"
"""Link class of a destination on another node (InfiniBand / RoCE / Ethernet)."""
LINK_CLASSES: Final = (INTRA_NODE, INTER_NODE)


def node_of(global_rank: int, ranks_per_node: int) -> int:
    """The node of a global rank under node-contiguous placement.

    >>> node_of(5, 4)
    1
    """
    if ranks_per_node < 1:
        raise ValueError(f"ranks_per_node ({ranks_per_node}) must be >= 1")
    return global_rank // ranks_per_node


def link_class(src_rank: int, dst_rank: int, ranks_per_node: int) -> str:
    """``"intra_node"`` if both global ranks share a node, else ``"inter_node"``.

    >>> link_class(0, 1, 2), link_class(1, 2, 2)
    ('intra_node', 'inter_node')
    """
    same = node_of(src_rank, ranks_per_node) == node_of(dst_rank, ranks_per_node)
    return INTRA_NODE if same else INTER_NODE


class KindTraffic(TypedDict):
    """One collective kind in a :class:`TrafficSnapshot`."""

    intra_node: int
    """Bytes sent to ranks on this rank's node."""
    inter_node: int
    """Bytes sent to ranks on other nodes."""
    seconds: float
    """Wall-clock seconds spent in this kind's timed collectives."""
    calls: int
    """Number of timed collectives of this kind."""


class TrafficSnapshot(TypedDict):
    """A plain-dict copy of a :class:`TrafficMeter` (JSON-serialisable)."""

    rank: int
    ranks_per_node: int
    intra_node: int
    """Bytes sent to ranks on this rank's node, all kinds."""
    inter_node: int
    """Bytes sent to ranks on other nodes, all kinds."""
    seconds: float
    """Sum of the per-kind seconds (overlapped collectives count once per kind)."""
    kinds: dict[str, KindTraffic]


@dataclass
class _Counter:
    intra_node: int = 0
    inter_node: int = 0
    seconds: float = 0.0
    calls: int = 0


class TrafficMeter:
    """Counts the bytes one rank sends per link class and collective kind, and the time per kind.

    Parameters
    ----------
    rank
        This process's global rank.
    ranks_per_node
        Ranks per node; ``node_of(r) = r // ranks_per_node``.
    clock
        Monotonic clock in seconds (injectable for tests).

    Examples
    --------
    >>> meter = TrafficMeter(rank=1, ranks_per_node=2)
    >>> meter.add_bytes("dispatch", dst_ranks=[0, 1, 2, 3], num_bytes=[10, 99, 20, 30])
    >>> snap = meter.snapshot()
    >>> snap["intra_node"], snap["inter_node"], snap["kinds"]["dispatch"]["inter_node"]
    (10, 50, 50)
    """

    def __init__(
        self, rank: int, ranks_per_node: int, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        if rank < 0:
            raise ValueError(f"rank ({rank}) must be >= 0")
        if ranks_per_node < 1:
            raise ValueError(f"ranks_per_node ({ranks_per_node}) must be >= 1")
        self.rank = rank
        self.ranks_per_node = ranks_per_node
        self._clock = clock
        self._kinds: dict[str, _Counter] = {}

    def link_class(self, dst_rank: int) -> str:
        """The link class from this rank to global rank ``dst_rank``."""
        return link_class(self.rank, dst_rank, self.ranks_per_node)

    def add_bytes(self, kind: str, dst_ranks: Sequence[int], num_bytes: Sequence[int]) -> None:
        """Count ``num_bytes[i]`` bytes sent to global rank ``dst_ranks[i]`` by a collective of ``kind``."""
        if len(dst_ranks) != len(num_bytes):
            raise ValueError(
                f"dst_ranks ({len(dst_ranks)} entries) and num_bytes ({len(num_bytes)}) differ in length"
            )
        counter = self._kinds.setdefault(kind, _Counter())
        for dst, n in zip(dst_ranks, num_bytes, strict=True):
            if dst == self.rank:
                continue  # a local copy: crosses no link
            if self.link_class(dst) == INTRA_NODE:
                counter.intra_node += n
            else:
                counter.inter_node += n

    def add_time(self, kind: str, seconds: float) -> None:
        """Count one collective of ``kind`` that took ``seconds``."""
        counter = self._kinds.setdefault(kind, _Counter())
        counter.seconds += seconds
        counter.calls += 1

    def start(self, synchronize: Callable[[], None] | None = None) -> float:
        """A start time for :meth:`stop`, after draining device work (for collectives issued asynchronously)."""
        if synchronize is not None:
            synchronize()
        return self._clock()

    def stop(self, kind: str, started: float, synchronize: Callable[[], None] | None = None) -> None:
        """Count one collective of ``kind`` that began at ``started`` (from :meth:`start`) and ends now."""
        if synchronize is not None:
            synchronize()
        self.add_time(kind, self._clock() - started)

    @contextmanager
    def timed(self, kind: str, synchronize: Callable[[], None] | None = None) -> Iterator[None]:
        """Time the enclosed collective as one call of ``kind``; ``synchronize`` runs before and after it."""
        started = self.start(synchronize)
        yield
        self.stop(kind, started, synchronize)

    def bytes_sent(self, link: str | None = None, kind: str | None = None) -> int:
        """Bytes sent, optionally restricted to one link class and/or one kind."""
        links = LINK_CLASSES if link is None else (link,)
        if link is not None and link not in LINK_CLASSES:
            raise ValueError(f"link ({link!r}) must be one of {LINK_CLASSES}")
        counters = self._kinds.values() if kind is None else [self._kinds.get(kind, _Counter())]
        return sum(getattr(c, name) for c in counters for name in links)

    def snapshot(self) -> TrafficSnapshot:
        """A plain-dict copy of the counters."""
        kinds = {
            kind: KindTraffic(
                intra_node=c.intra_node, inter_node=c.inter_node, seconds=c.seconds, calls=c.calls
            )
            for kind, c in sorted(self._kinds.items())
        }
        return TrafficSnapshot(
            rank=self.rank,
            ranks_per_node=self.ranks_per_node,
            intra_node=sum(k["intra_node"] for k in kinds.values()),
            inter_node=sum(k["inter_node"] for k in kinds.values()),
            seconds=sum(k["seconds"] for k in kinds.values()),
            kinds=kinds,
        )

    def reset(self) -> None:
        """Forget everything counted so far."""
        self._kinds.clear()
