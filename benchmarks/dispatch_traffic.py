"""Inter-node bytes of the runtime's dispatchers on the emulated cluster, three ways (root only).

Brings up a testbed of 2 nodes x 2 ranks, runs forward dispatch + combine of random top-2 routing over 8
experts with each dispatcher (``planner/runtime/dispatch_bench.py``), and prints per dispatcher:
- the bytes the kernel's interface counters saw leave the nodes (all traffic, TCP/IP headers included),
- the bytes the runtime's meter counted on inter-node links,
- the volume the routing implies (payload rows, and payload plus the expert slots and weights the
  hierarchical dispatcher carries with each row),
- seconds per dispatch + combine;
then the ratios the issue asks for: kernel over the node-deduplicated volume for ``hierarchical``
(expected about 1), flat over hierarchical against the cost model's ratio for the same routing
(``planner.costmodel.dispatchers.dispatch_copies``), and MoNTA over the TP-duplicated flat all-to-all
(expected 1/2), and the all-gather dispatcher over the flat one.

    sudo python benchmarks/dispatch_traffic.py [--mbit 1000] [--tokens 1024] [--hidden 512]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from planner.costmodel.dispatchers import dispatch_copies
from planner.execution import testbed
from planner.execution.launcher import run_ranks, testbed_placement

EXPERTS, TOPK, NODES, RANKS_PER_NODE = 8, 2, 2, 2
KINDS = ("alltoall", "hierarchical", "allgather", "alltoall-tp", "monta")


def run(kind: str, args: argparse.Namespace) -> dict[str, float]:
    placement = testbed_placement(NODES * RANKS_PER_NODE)
    with tempfile.TemporaryDirectory() as tmp:
        config = {
            "kind": kind, "tokens": args.tokens, "hidden": args.hidden, "experts": EXPERTS, "topk": TOPK,
            "iterations": args.iterations, "seed": 1, "ranks_per_node": RANKS_PER_NODE, "chunks": 2,
            "results_path": str(Path(tmp) / "out.json"),
        }  # fmt: skip
        run_ranks("planner.runtime.dispatch_bench", json.dumps(config), placement, Path(tmp),
                  time.time() + 300, f"dispatch benchmark ({kind})")  # fmt: skip
        ranks = json.loads((Path(tmp) / "out.json").read_text())
    row = ranks[0]["row_bytes"]
    metadata = TOPK * 8  # int32 expert slot + float32 weight per slot, riding with each hierarchical row
    dedup_rows = sum(r["expected_dedup_rows"] for r in ranks)
    return {
        "kernel": sum(r["kernel_tx_bytes"] for r in ranks),
        "meter": sum(r["meter_inter_node"] for r in ranks),
        "flat_payload": 2 * sum(r["expected_flat_rows"] for r in ranks) * row,
        "dedup_payload": 2 * dedup_rows * row,
        "dedup_with_slots": dedup_rows * (2 * row + metadata),
        "seconds": max(r["seconds_per_call"] for r in ranks),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mbit", type=float, default=1000.0)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    testbed.up(NODES, RANKS_PER_NODE, args.mbit)
    try:
        figures = {kind: run(kind, args) for kind in KINDS}
    finally:
        testbed.down()
    mib = 2**20
    print(f"{NODES} nodes x {RANKS_PER_NODE} ranks at {args.mbit:g} Mbit/s; {args.tokens} tokens x {args.hidden} "
          f"fp32 per rank, top-{TOPK} of {EXPERTS} experts, {args.iterations} forward dispatch+combine")  # fmt: skip
    print(
        f"{'dispatcher':<14}{'kernel MiB':>12}{'meter MiB':>11}{'flat MiB':>10}{'dedup MiB':>11}{'s/call':>9}"
    )
    for kind, f in figures.items():
        print(f"{kind:<14}{f['kernel'] / mib:>12.2f}{f['meter'] / mib:>11.2f}{f['flat_payload'] / mib:>10.2f}"
              f"{f['dedup_with_slots'] / mib:>11.2f}{f['seconds']:>9.3f}")  # fmt: skip
    hier, flat = figures["hierarchical"], figures["alltoall"]
    model_flat = dispatch_copies(
        "alltoall", num_experts=EXPERTS, topk=TOPK, ep=4, ep_ranks_per_node=2
    ).inter_node
    model_hier = dispatch_copies(
        "hierarchical", num_experts=EXPERTS, topk=TOPK, ep=4, ep_ranks_per_node=2
    ).inter_node
    print(
        f"hierarchical: kernel / node-deduplicated volume (with slots) = "
        f"{hier['kernel'] / hier['dedup_with_slots']:.3f}; meter / volume = {hier['meter'] / hier['dedup_with_slots']:.3f}"
    )
    print(
        f"flat / hierarchical inter-node bytes: kernel {flat['kernel'] / hier['kernel']:.3f}, routing payload "
        f"{flat['flat_payload'] / hier['dedup_payload']:.3f}, cost model {model_flat / model_hier:.3f}"
    )
    gathered = figures["allgather"]
    model_gather = dispatch_copies(
        "allgather", num_experts=EXPERTS, topk=TOPK, ep=4, ep_ranks_per_node=2
    ).inter_node
    print(
        f"allgather / flat inter-node bytes: kernel {gathered['kernel'] / flat['kernel']:.3f}, meter "
        f"{gathered['meter'] / flat['meter']:.3f}, cost model {model_gather / model_flat:.3f}"
    )
    duplicated, monta = figures["alltoall-tp"], figures["monta"]
    print(f"monta / TP-duplicated flat (TP=2): kernel {monta['kernel'] / duplicated['kernel']:.3f}, "
          f"meter {monta['meter'] / duplicated['meter']:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
