"""Which global ranks form each parallel group of a plan, in Megatron-Core's rank order (torch-free).

Megatron-Core (``megatron/core/parallel_state.py``, ``RankGenerator``; ``../shared/reference/ecosystem.md``
§1.6) numbers ranks with the first axis of its order string innermost (contiguous):

- dense grid, order ``tp-cp-dp-pp``:  ``rank = tp + TP*(cp + CP*(dp + DP*pp))``
- expert grid, order ``tp-ep-dp-pp`` with the expert degrees (ETP, EP, EDP; CP folded into EDP):
  ``rank = etp + ETP*(ep + EP*(edp + EDP*pp))``

A group along one axis holds the ranks that differ only in that axis's coordinate. Both grids cover the
same ranks of each pipeline stage, since ``TP*CP*DP == ETP*EP*EDP``.

This is written here again rather than imported from the cost model on purpose: the runtime must not
import the cost model (it checks it), so the two implementations check each other (tests compare them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product

from planner.schema import ParallelConfig

__all__ = ["DENSE_AXES", "EXPERT_AXES", "GroupLayout", "axis_groups", "chunk_layers", "group_layout"]

DENSE_AXES = ("tp", "cp", "dp", "pp")
"""Dense grid axes, innermost first."""
EXPERT_AXES = ("etp", "ep", "edp", "pp")
"""Expert grid axes, innermost first."""


def axis_groups(sizes: Sequence[int], axis: int) -> list[list[int]]:
    """Groups of ranks along ``axis`` of a grid whose axes (innermost first) have ``sizes``."""
    strides = [1]
    for size in sizes[:-1]:
        strides.append(strides[-1] * size)
    others = [range(size) if i != axis else range(1) for i, size in enumerate(sizes)]
    groups = []
    for coords in product(*reversed(others)):
        base = sum(c * s for c, s in zip(reversed(coords), strides, strict=True))
        groups.append([base + k * strides[axis] for k in range(sizes[axis])])
    return sorted(groups)


@dataclass(frozen=True)
class GroupLayout:
    """Every group of every axis of a plan, as lists of global ranks."""

    world_size: int
    groups: dict[str, list[list[int]]]
    """Axis name (``tp cp dp pp etp ep edp``, and the combined ``dp_cp tp_cp``) to its groups."""

    def group_of(self, axis: str, rank: int) -> list[int]:
        """The group along ``axis`` that holds ``rank``."""
        return next(group for group in self.groups[axis] if rank in group)


def group_layout(parallel: ParallelConfig, world_size: int) -> GroupLayout:
    """The groups of a plan's layout on ``world_size`` ranks (ValueError when the degrees do not tile it)."""
    p = parallel
    dense = [p.tp, p.cp, p.dp, p.pp]
    expert = [p.etp, p.ep, p.edp, p.pp]
    for name, sizes in (("tp x cp x dp x pp", dense), ("etp x ep x edp x pp", expert)):
        total = 1
        for size in sizes:
            total *= size
        if total != world_size:
            raise ValueError(f"{name} = {total} does not equal the world size {world_size}")
    groups = {axis: axis_groups(dense, i) for i, axis in enumerate(DENSE_AXES)}
    groups.update({axis: axis_groups(expert, i) for i, axis in enumerate(EXPERT_AXES[:3])})
    # Megatron's combined groups of adjacent dense axes: dense gradients are summed over dp x cp, and the
    # routers' statistics over the ranks that share a sequence, tp x cp.
    groups["dp_cp"] = axis_groups([p.tp, p.cp * p.dp, p.pp], 1)
    groups["tp_cp"] = axis_groups([p.tp * p.cp, p.dp, p.pp], 0)
    return GroupLayout(world_size=world_size, groups=groups)


def chunk_layers(num_layers: int, pp: int, vpp: int, layers_per_stage: Sequence[int] | None) -> list[range]:
    """The decoder layers of each of the ``pp * vpp`` pipeline chunks, in order (ValueError, with the
    rule, when they do not split so)."""
    chunks = pp * vpp
    if layers_per_stage is not None:
        sizes = list(layers_per_stage)
        if len(sizes) != chunks or sum(sizes) != num_layers:
            raise ValueError(
                f"layers_per_stage {sizes} must have pp x vpp = {chunks} entries summing to the model's "
                f"{num_layers} layers"
            )
    elif num_layers % chunks:
        raise ValueError(
            f"pp x vpp = {chunks} must divide the model's {num_layers} layers (an even split), or the plan "
            "must give layers_per_stage"
        )
    else:
        sizes = [num_layers // chunks] * chunks
    starts = [sum(sizes[:i]) for i in range(chunks)]
    return [range(start, start + size) for start, size in zip(starts, sizes, strict=True)]
