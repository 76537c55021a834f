"""The runtime's rank layout against Megatron's documented example and the cost model's strides."""

from __future__ import annotations

import pytest

from planner.costmodel.geometry import group_stride
from planner.runtime.groups import axis_groups, group_layout
from planner.schema import MeshAxis, ParallelConfig


def test_megatron_worked_example() -> None:
    # ecosystem.md §1.6: 16 ranks, tp2 pp2 ep4 -> dp4 per stage, expert grid etp1 ep4 edp2.
    layout = group_layout(ParallelConfig.for_world(16, tp=2, pp=2, ep=4), 16)
    assert layout.group_of("tp", 5) == [4, 5]
    assert layout.group_of("pp", 3) == [3, 11]
    assert layout.group_of("dp", 0) == [0, 2, 4, 6]
    assert layout.group_of("ep", 0) == [0, 1, 2, 3]
    assert layout.group_of("edp", 1) == [1, 5]
    assert len(layout.groups["tp"]) == 8 and len(layout.groups["ep"]) == 4


def test_axis_groups_partition_the_grid() -> None:
    groups = axis_groups([2, 3, 2], 1)
    assert groups == [[0, 2, 4], [1, 3, 5], [6, 8, 10], [7, 9, 11]]
    assert sorted(r for g in groups for r in g) == list(range(12))


@pytest.mark.parametrize(
    "degrees",
    [{"tp": 2}, {"tp": 2, "ep": 2}, {"pp": 2, "ep": 4}, {"tp": 2, "cp": 2, "ep": 2, "etp": 2}, {"ep": 8}],
)
def test_strides_agree_with_the_cost_model(degrees: dict[str, int]) -> None:
    parallel = ParallelConfig.for_world(16, **degrees)  # type: ignore[arg-type]
    layout = group_layout(parallel, 16)
    for axis in ("tp", "cp", "dp", "pp", "etp", "ep", "edp"):
        size = getattr(parallel, axis)
        for group in layout.groups[axis]:
            assert len(group) == size
            if size > 1:
                assert group[1] - group[0] == group_stride(parallel, MeshAxis(axis))


def test_degrees_that_do_not_tile_the_world_are_refused() -> None:
    with pytest.raises(ValueError, match="does not equal the world size 8"):
        group_layout(ParallelConfig.for_world(16, tp=2), 8)


def test_combined_groups_join_adjacent_dense_axes() -> None:
    # 16 ranks, tp2 cp2 dp2 pp2: rank = tp + 2 cp + 4 dp + 8 pp.
    layout = group_layout(ParallelConfig.for_world(16, tp=2, cp=2, pp=2), 16)
    assert layout.group_of("dp_cp", 1) == [1, 3, 5, 7]  # same tp (1) and pp (0)
    assert layout.group_of("tp_cp", 13) == [12, 13, 14, 15]  # same dp (1) and pp (1)
    for name, axes in (("dp_cp", ("dp", "cp")), ("tp_cp", ("tp", "cp"))):
        for group in layout.groups[name]:
            # a combined group is the union of the groups of its axes through any of its ranks
            members = {r for axis in axes for r in layout.group_of(axis, group[0])}
            assert members <= set(group) and len(group) == 4
