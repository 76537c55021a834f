"""Dispatch volumes against the seeds' worked values and a brute-force simulation of top-k routing."""

from __future__ import annotations

import random

import pytest

from planner.costmodel.dispatchers import dispatch_copies
from planner.costmodel.routing import (
    expected_distinct,
    migration_saved_fraction,
    p_hit,
    topology_aware_remote_fraction,
)


@pytest.mark.parametrize(
    ("sets", "expected"),
    # ../shared/reference/seeds.md §6.2, E=256, k=8: distinct nodes 3.61 (4), 5.29 (8), 6.52 (16), 7.27 (32);
    # distinct ranks of EP64: 7.68.
    [(4, 3.61), (8, 5.2947), (16, 6.52), (32, 7.27), (64, 7.68)],
)
def test_distinct_targets_match_worked_values(sets: int, expected: float) -> None:
    assert expected_distinct(sets, 256, 8) == pytest.approx(expected, abs=0.006)


def test_p_hit_by_hand() -> None:
    # 4 experts, top-2, a set of 1 expert: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert p_hit(4, 2, 1) == pytest.approx(0.5)
    # group-limited: 4 groups of 2, choose 2 groups, then 2 experts of the 4 in them; a set = 1 group:
    # P(group chosen) = 2/4; then 1 - C(2,2)/C(4,2) = 5/6; together 0.5 * 5/6 = 5/12
    assert p_hit(8, 2, 2, num_groups=4, group_topk=2) == pytest.approx(5 / 12)


def _route(rng: random.Random, experts: int, k: int, groups: int, group_topk: int) -> list[int]:
    if groups <= 1:
        return rng.sample(range(experts), k)
    per = experts // groups
    chosen = rng.sample(range(groups), group_topk)
    pool = [g * per + e for g in chosen for e in range(per)]
    return rng.sample(pool, k)


def _simulate(
    experts: int, k: int, ep: int, per_node: int, groups: int = 1, group_topk: int = 1, n: int = 20000
):
    """Average copies per token by link class for flat and node-deduplicated dispatch."""
    rng = random.Random(0)
    per_rank = experts // ep
    flat_inter = flat_intra = hier_inter = hier_intra = 0.0
    for _ in range(n):
        src = rng.randrange(ep)
        src_node = src // per_node
        targets = [e // per_rank for e in _route(rng, experts, k, groups, group_topk)]
        flat_inter += sum(1 for t in targets if t // per_node != src_node)
        flat_intra += sum(1 for t in targets if t // per_node == src_node and t != src)
        ranks = set(targets)
        nodes = {t // per_node for t in ranks}
        hier_inter += len(nodes - {src_node})
        local = len({t for t in ranks if t // per_node == src_node} - {src})
        forwarded = 0
        for node in nodes - {src_node}:
            peer = node * per_node + src % per_node  # the same local rank on the remote node receives
            forwarded += len({t for t in ranks if t // per_node == node} - {peer})
        hier_intra += local + forwarded
    return flat_inter / n, flat_intra / n, hier_inter / n, hier_intra / n


@pytest.mark.parametrize(
    ("experts", "k", "ep", "per_node", "groups", "group_topk"),
    [
        (256, 8, 64, 8, 1, 1),
        (256, 8, 64, 8, 8, 4),
        (64, 6, 16, 8, 1, 1),
        (8, 2, 8, 4, 1, 1),
        (128, 8, 32, 8, 1, 1),
    ],
)
def test_volumes_match_brute_force_routing(
    experts: int, k: int, ep: int, per_node: int, groups: int, group_topk: int
) -> None:
    sim = _simulate(experts, k, ep, per_node, groups, group_topk)
    flat = dispatch_copies("alltoall", num_experts=experts, topk=k, ep=ep, ep_ranks_per_node=per_node)
    hier = dispatch_copies(
        "hierarchical", num_experts=experts, topk=k, ep=ep, ep_ranks_per_node=per_node,
        num_groups=groups, group_topk=group_topk,
    )  # fmt: skip
    if groups == 1:  # a flat all-to-all ignores group limits: every copy travels
        assert flat.inter_node == pytest.approx(sim[0], rel=0.03)
        assert flat.intra_node == pytest.approx(sim[1], rel=0.05)
    assert hier.inter_node == pytest.approx(sim[2], rel=0.03)
    assert hier.intra_node == pytest.approx(sim[3], rel=0.03)


def test_hierarchical_saves_inter_node_copies_for_deepseek_v3() -> None:
    flat = dispatch_copies("alltoall", num_experts=256, topk=8, ep=64, ep_ranks_per_node=8)
    hier = dispatch_copies(
        "hierarchical", num_experts=256, topk=8, ep=64, ep_ranks_per_node=8, num_groups=8, group_topk=4
    )
    # flat: 8 * 56/64 = 7 copies leave the node; node-limited dedup: at most 4 nodes, about 3.2 remote
    assert flat.inter_node == pytest.approx(7.0)
    assert hier.inter_node < 4.0 and flat.inter_node / hier.inter_node > 2.0


def test_monta_divides_the_all_to_all_by_tp() -> None:
    base = dispatch_copies(
        "alltoall", num_experts=2, topk=1, ep=2, ep_ranks_per_node=1, tp=8, tp_duplicates=True
    )
    monta = dispatch_copies("monta", num_experts=2, topk=1, ep=2, ep_ranks_per_node=1, tp=8)
    # Per token of a rank's 1/8 share: the duplicated baseline sends all 8 shares, k*(P-1)/P = 0.5 copies
    # each, off the node -> 4; MoNTA sends its own share -> 0.5: the published 8x at TP=8.
    assert base.inter_node == pytest.approx(4.0)
    assert monta.inter_node == pytest.approx(0.5)
    assert base.inter_node / monta.inter_node == pytest.approx(8)
    # the TP all-gather brings the other 7 ranks' routed copies (k = 1 each)
    assert monta.tp_allgather == pytest.approx(7)


def test_topology_aware_fraction_balances_both_links() -> None:
    # P=16, r=8, B_intra=160, B_inter=24: f = 24*8 / (160*7 + 24*8) = 192/1312
    f = topology_aware_remote_fraction(16, 8, 160, 24)
    assert f == pytest.approx(192 / 1312)
    copies = 8 * 15 / 16
    # Time per link for one unit of bandwidth share: off-node copies over 8 peers' NIC... equal finish
    inter_time = copies * f / 24 / 8
    intra_time = copies * (1 - f) / 160 / 7
    assert inter_time == pytest.approx(intra_time)
    assert f < 8 / 15  # less than uniform routing's off-node share


def test_condensation_scales_every_copy() -> None:
    full = dispatch_copies("alltoall", num_experts=8, topk=2, ep=8, ep_ranks_per_node=4)
    half = dispatch_copies(
        "alltoall", num_experts=8, topk=2, ep=8, ep_ranks_per_node=4, condense_fraction=0.5
    )
    assert half.inter_node == pytest.approx(full.inter_node / 2) and half.intra_node == pytest.approx(
        full.intra_node / 2
    )


def test_migration_saving_against_simulation() -> None:
    rng = random.Random(1)
    copies, ranks, trials = 500, 16, 4000
    saved = 0.0
    for _ in range(trials):
        counts = [0] * ranks
        for _ in range(copies):
            counts[rng.randrange(ranks)] += 1
        saved += (max(counts) - counts[0]) / copies  # rank 0 is home
    assert migration_saved_fraction(copies, ranks) == pytest.approx(saved / trials, rel=0.15)
    assert migration_saved_fraction(copies, 1) == 0.0
