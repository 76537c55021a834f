"""One rank of the dispatch-traffic benchmark (``benchmarks/dispatch_traffic.py``): forward dispatch and
combine of random top-k routing with one dispatcher, counted three ways.

1. **Expected** from the routing itself, before any communication: flat all-to-all sends one row per
   (token, expert on another rank); node-deduplicated dispatch sends one row per (token, other node it
   needs), plus the expert slots and weights that ride along; the all-gather dispatcher sends every
   token to every other EP member (``planner/runtime/dispatchers/``).
2. **The runtime's meter** (``planner/runtime/meter.py``): bytes each collective sent, per link class.
3. **The kernel's interface counters** of the node's ``eth0`` (on the testbed), read by each node's first
   rank around the timed window: everything that really crossed between nodes, headers included.

Layouts on ``world = nodes x ranks_per_node``: ``alltoall``, ``allgather`` and ``hierarchical`` use one
EP group of every rank; ``alltoall-tp`` and ``monta`` put TP pairs inside a node and EP across nodes (MoNTA's
layout: TP over NVLink, EP over the network), with both TP ranks holding the same tokens.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from planner.execution.launcher import write_record
from planner.execution.process_group import joined, subgroup
from planner.runtime.dispatchers.allgather import AllGatherDispatcher
from planner.runtime.dispatchers.alltoall import AllToAllDispatcher
from planner.runtime.dispatchers.hierarchical import HierarchicalDispatcher, hierarchical_groups
from planner.runtime.dispatchers.monta import MoNTADispatcher
from planner.runtime.meter import TrafficMeter, node_of
from planner.runtime.protocols import TokenDispatcher

__all__ = ["main"]

COUNTER = Path("/sys/class/net/eth0/statistics/tx_bytes")


def _tx_bytes() -> int:
    return int(COUNTER.read_text()) if COUNTER.exists() else 0


def _routing(tokens: int, experts: int, topk: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.rand(tokens, experts, generator=generator).argsort(dim=1)[:, :topk]
    weights = torch.softmax(torch.rand(tokens, topk, generator=generator), dim=1)
    return ids, weights


def main(argv: list[str] | None = None) -> int:
    config = json.loads((sys.argv[1:] if argv is None else argv)[0])
    with joined("gloo", 120.0):
        _bench(config)
    return 0


def _bench(config: dict[str, Any]) -> None:
    """Every rank's share of the benchmark; rank 0 writes all ranks' records."""
    kind, rpn = config["kind"], int(config["ranks_per_node"])
    t, h, e, k, iters = (int(config[key]) for key in ("tokens", "hidden", "experts", "topk", "iterations"))
    rank, world = dist.get_rank(), dist.get_world_size()
    nodes = world // rpn
    meter = TrafficMeter(rank, rpn)
    tp_layout = kind in ("alltoall-tp", "monta")
    if tp_layout:
        # TP pairs inside a node, EP across nodes over the same TP index (MoNTA's layout).
        tp_groups = [list(range(node * rpn + pair, node * rpn + pair + 2)) for node in range(nodes)
                     for pair in range(0, rpn, 2)]  # fmt: skip
        ep_groups = [[r for r in range(world) if r % 2 == index and (r % rpn) // 2 == pair]
                     for pair in range(rpn // 2) for index in range(2)]  # fmt: skip
    else:
        tp_groups, ep_groups = [[r] for r in range(world)], [list(range(world))]
    mine: dict[str, Any] = {}
    for name, groups in (("tp", tp_groups), ("ep", ep_groups)):
        for ranks in groups:
            group = subgroup(ranks)
            if rank in ranks:
                mine[name], mine[name + "_ranks"] = group, ranks
    hierarchy = hierarchical_groups(ep_groups, rpn) if kind == "hierarchical" else None
    dispatcher: TokenDispatcher
    if kind == "hierarchical":
        assert hierarchy is not None
        dispatcher = HierarchicalDispatcher(hierarchy, e, meter=meter)
    elif kind == "monta":
        dispatcher = MoNTADispatcher(mine["ep"], mine["tp"], e, num_chunks=int(config["chunks"]), meter=meter)
    elif kind == "allgather":
        dispatcher = AllGatherDispatcher(mine["ep"], e, meter=meter)
    elif kind in ("alltoall", "alltoall-tp"):
        dispatcher = AllToAllDispatcher(mine["ep"], e, meter=meter)
    else:
        raise ValueError(
            f"unknown benchmark kind {kind!r}: alltoall, allgather, hierarchical, alltoall-tp, monta"
        )
    ep_ranks: list[int] = mine["ep_ranks"]
    tp_ranks: list[int] = mine["tp_ranks"]
    # TP peers hold the same tokens: seed by the TP group's first rank.
    seed = int(config["seed"]) * 1000 + tp_ranks[0]
    ids, weights = _routing(t, e, k, seed)
    tokens = torch.randn(t, h, generator=torch.Generator().manual_seed(seed))
    per_rank = e // len(ep_ranks)

    def experts(tokens: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        return tokens * 2.0  # the work is not what is measured here

    # Expected inter-node payload of this rank per call, from the routing (dispatch; combine is the same).
    my_node = node_of(rank, rpn)
    owner_node = [node_of(ep_ranks[expert // per_rank], rpn) for expert in range(e)]
    flat_remote = sum(owner_node[int(x)] != my_node for x in ids.reshape(-1))
    dedup_remote = sum(len({owner_node[int(x)] for x in row} - {my_node}) for row in ids)
    # The all-gather dispatcher: every token to every EP member on another node (equal token counts).
    gather_remote = t * sum(node_of(r, rpn) != my_node for r in ep_ranks)
    row_bytes = h * tokens.element_size()
    with torch.no_grad():
        dispatcher(tokens, ids, weights, experts)  # warm-up: connections, allocator
        dist.barrier()
        before = _tx_bytes() if rank % rpn == 0 else 0
        meter.reset()
        start = time.perf_counter()
        for _ in range(iters):
            dispatcher(tokens, ids, weights, experts)
        elapsed = time.perf_counter() - start
        dist.barrier()
        after = _tx_bytes() if rank % rpn == 0 else 0
    record = {
        "rank": rank,
        "kernel_tx_bytes": after - before,
        "meter_inter_node": meter.snapshot()["inter_node"],
        "meter_by_kind": {name: v["inter_node"] for name, v in meter.snapshot()["kinds"].items()},
        "expected_flat_rows": int(flat_remote) * iters,
        "expected_dedup_rows": int(dedup_remote) * iters,
        "expected_gather_rows": gather_remote * iters,
        "row_bytes": row_bytes,
        "seconds_per_call": elapsed / iters,
    }
    gathered: list[object] = [None] * world
    dist.all_gather_object(gathered, record)
    if rank == 0:
        write_record(config["results_path"], json.dumps(gathered))


if __name__ == "__main__":
    sys.exit(main())
