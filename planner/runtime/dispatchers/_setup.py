"""What a dispatcher kind's ``factory`` is given: the layout, the experts, this rank's groups, the meter.

Torch-free at run time (the process group type is only named for the type checker), so the registry can
name it without importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from planner.runtime.meter import TrafficMeter
from planner.schema import ParallelConfig

if TYPE_CHECKING:
    import torch.distributed as dist

__all__ = ["DispatcherSetup"]


@dataclass(frozen=True)
class DispatcherSetup:
    """One run's dispatcher settings on one rank (built once by the run loop, before the model)."""

    parallel: ParallelConfig
    """The layout; ``parallel.dispatcher`` names the kind and its options."""
    num_experts: int
    """E, the routed experts of every MoE layer."""
    ranks_per_node: int
    """Node-contiguous placement: ``node_of(r) = r // ranks_per_node``."""
    groups: Mapping[str, dist.ProcessGroup]
    """This rank's process group per axis, as the run loop creates them (``tp dp ep edp pp etp cp dp_cp
    tp_cp``)."""
    ep_groups: Sequence[Sequence[int]]
    """Every EP group's global ranks (``GroupLayout.groups["ep"]``): what a kind needs that creates its own
    groups collectively (every rank creates every group, in the same order)."""
    meter: TrafficMeter
    """Counts every collective's bytes and time."""
