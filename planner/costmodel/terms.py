"""The per-micro-batch terms of one pipeline rank, and what a layer's terms are computed from."""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.schema import ClusterProfile, ModelSpec, ParallelConfig, TrainingSpec

__all__ = ["LayerContext", "Terms", "merge_terms"]


@dataclass
class Terms:
    """Per-micro-batch time of one pipeline rank, by term: (total, exposed) seconds."""

    items: dict[str, list[float]] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    bytes: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, total: float, exposed: float | None = None, link: str | None = None) -> None:
        entry = self.items.setdefault(name, [0.0, 0.0])
        entry[0] += total
        entry[1] += total if exposed is None else exposed
        if link:
            self.links[name] = link

    def add_bytes(self, link: str, amount: float) -> None:
        self.bytes[link] = self.bytes.get(link, 0.0) + amount

    def exposed(self) -> float:
        return sum(exposed for _, exposed in self.items.values())


@dataclass(frozen=True, slots=True)
class LayerContext:
    model: ModelSpec
    training: TrainingSpec
    parallel: ParallelConfig
    cluster: ClusterProfile
    tokens: float
    """Tokens per rank per micro-batch (the sequence-parallel share)."""
    gathered: float
    """Tokens of a TP group's gathered sequence per micro-batch."""
    imbalance: float


def merge_terms(into: Terms, sub: Terms, times: int) -> None:
    for name, (total, exposed) in sub.items.items():
        into.add(name, total * times, exposed * times, sub.links.get(name))
    for link, amount in sub.bytes.items():
        into.add_bytes(link, amount * times)
