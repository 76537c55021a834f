"""Where each process group lives: Megatron's rank order placed on the cluster's nodes.

Dense grid, order tp-cp-ep-dp-pp (``--use-tp-pp-dp-mapping`` off; ecosystem.md §1.6), leftmost
fastest: ``rank = tp + TP*(cp + CP*(dp + DP*pp))``. Expert grid (parallel folding):
``rank = etp + ETP*(ep + EP*(edp + EDP*pp))``. A group is the ranks that differ only in its own
coordinate: stride = product of the sizes to its left. Ranks fill nodes in order (torchrun's
node-contiguous placement), so rank r lives on node ``r // G``.

``group_geometry`` enumerates the first group and counts the nodes it spans and its ranks per node;
for the power-of-two layouts used in practice every group of a kind has the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from planner.schema import MeshAxis, ParallelConfig

__all__ = ["GroupGeometry", "group_geometry", "group_stride"]


@dataclass(frozen=True, slots=True)
class GroupGeometry:
    """Shape of one process group on the cluster."""

    size: int
    """Ranks in the group."""
    num_nodes: int
    """Nodes the group spans."""
    ranks_per_node: int
    """Group members on each node it spans (the most on any node)."""

    @property
    def crosses_nodes(self) -> bool:
        return self.num_nodes > 1


def group_stride(parallel: ParallelConfig, axis: MeshAxis) -> int:
    """Rank distance between neighbours of a group along ``axis``."""
    p = parallel
    strides = {
        MeshAxis.TP: 1,
        MeshAxis.CP: p.tp,
        MeshAxis.DP: p.tp * p.cp,
        MeshAxis.PP: p.tp * p.cp * p.dp,
        MeshAxis.ETP: 1,
        MeshAxis.EP: p.etp,
        MeshAxis.EDP: p.etp * p.ep,
    }
    return strides[axis]


@lru_cache(maxsize=4096)
def _geometry(size: int, stride: int, gpus_per_node: int) -> GroupGeometry:
    per_node: dict[int, int] = {}
    for i in range(size):
        node = (i * stride) // gpus_per_node
        per_node[node] = per_node.get(node, 0) + 1
    return GroupGeometry(size=size, num_nodes=len(per_node), ranks_per_node=max(per_node.values()))


def group_geometry(parallel: ParallelConfig, axis: MeshAxis, gpus_per_node: int) -> GroupGeometry:
    """Nodes spanned and ranks per node of the group along ``axis``.

    >>> p = ParallelConfig.for_world(16, tp=2, pp=2, ep=4)  # ecosystem.md §1.6 worked example
    >>> group_geometry(p, MeshAxis.PP, 8), group_geometry(p, MeshAxis.EP, 8).num_nodes
    (GroupGeometry(size=2, num_nodes=2, ranks_per_node=1), 1)
    """
    return _geometry(parallel.degree(axis), group_stride(parallel, axis), gpus_per_node)
