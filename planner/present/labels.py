"""Short labels for reports and figures (no rich: the figure writer and the workflows use them too)."""

from __future__ import annotations

from planner.schema import ParallelConfig

__all__ = ["layout_label"]


def layout_label(p: ParallelConfig) -> str:
    """A layout in one line: ``tp2 pp8 vpp4 ep16 etp1 dp8 edp1 mbs1``."""
    text = f"tp{p.tp} pp{p.pp}" + (f" vpp{p.vpp}" if p.vpp > 1 else "") + (f" cp{p.cp}" if p.cp > 1 else "")
    return text + f" ep{p.ep} etp{p.etp} dp{p.dp} edp{p.edp} mbs{p.micro_batch}"
