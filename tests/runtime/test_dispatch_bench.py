"""The dispatch-traffic benchmark's rank (``planner/runtime/dispatch_bench.py``) on local ranks: the
runtime's meter must count exactly the inter-node volume the routing implies (the kernel counters are
only read on the testbed, by ``benchmarks/dispatch_traffic.py``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from planner.execution.launcher import RankPlacement, local_placement, run_ranks

pytestmark = pytest.mark.dist


def _bench(kind: str, tmp_path: Path) -> list[dict[str, Any]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = {"kind": kind, "tokens": 64, "hidden": 16, "experts": 8, "topk": 2, "iterations": 2, "seed": 3,
              "ranks_per_node": 2, "chunks": 2, "results_path": str(tmp_path / "out.json")}  # fmt: skip
    base = local_placement(4)
    placement = RankPlacement(base.prefixes, base.master_addr, base.interface, 2)
    run_ranks(
        "planner.runtime.dispatch_bench", json.dumps(config), placement, tmp_path, kind,
        timeout_s=60, deadline=time.time() + 120,
    )  # fmt: skip
    ranks: list[dict[str, Any]] = json.loads((tmp_path / "out.json").read_text())
    return ranks


def _total(ranks: list[dict[str, Any]], key: str) -> int:
    return sum(int(r[key]) for r in ranks)


def test_flat_meter_equals_the_routing_volume(tmp_path: Path) -> None:
    ranks = _bench("alltoall", tmp_path)
    row = int(ranks[0]["row_bytes"])
    by_kind = [r["meter_by_kind"] for r in ranks]
    dispatched = sum(int(k["dispatch"]) + int(k["combine"]) for k in by_kind)
    assert dispatched == 2 * _total(ranks, "expected_flat_rows") * row


def test_hierarchical_meter_is_the_node_deduplicated_volume(tmp_path: Path) -> None:
    ranks = _bench("hierarchical", tmp_path)
    flat = _total(ranks, "expected_flat_rows")
    dedup = _total(ranks, "expected_dedup_rows")
    row = int(ranks[0]["row_bytes"])
    assert dedup < flat
    combine = sum(int(r["meter_by_kind"]["combine"]) for r in ranks)
    assert combine == dedup * row  # pre-reduced in the node: one row back per (token, node)
    meter = _total(ranks, "meter_inter_node")
    assert 2 * dedup * row <= meter <= dedup * (2 * row + 2 * 8) + 4096  # payload, slots, counts


def test_monta_sends_half_of_the_duplicated_flat_volume(tmp_path: Path) -> None:
    duplicated = _bench("alltoall-tp", tmp_path / "a")
    monta = _bench("monta", tmp_path / "b")
    flat_bytes = sum(int(r["meter_by_kind"]["dispatch"]) for r in duplicated)
    monta_bytes = sum(int(r["meter_by_kind"]["dispatch"]) for r in monta)
    assert monta_bytes / flat_bytes == pytest.approx(0.5, rel=0.1)


def test_allgather_meter_is_every_token_to_every_member_on_another_node(tmp_path: Path) -> None:
    ranks = _bench("allgather", tmp_path)
    row = int(ranks[0]["row_bytes"])
    gathered = _total(ranks, "expected_gather_rows")
    assert gathered == 4 * 64 * 2 * 2  # 4 ranks' 64 tokens to the 2 members off their node, 2 iterations
    by_kind = [r["meter_by_kind"] for r in ranks]
    # Equal token counts: no padding. The combine brings each member's rows back from every other member;
    # the dispatch carries each token's top-2 expert ids (int32) and weights (float32) along.
    assert sum(int(k["combine"]) for k in by_kind) == gathered * row
    assert sum(int(k["dispatch"]) for k in by_kind) == gathered * (row + 2 * (4 + 4))
