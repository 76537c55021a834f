"""Record `moeplan run` measurements on the emulated cluster for `moeplan calibrate` (root, Linux).

Brings nothing up by itself: start the testbed and probe it first, then pass the profile:

    moeplan testbed up --nodes 2 --ranks-per-node 2 --inter-node-mbit 200
    moeplan probe --testbed --budget 60 -o runs/testbed.yaml
    python benchmarks/calibration_runs.py --cluster runs/testbed.yaml --out runs/

Each layout of the matrix below (tiny-moe; expert parallelism 1, 2, 4; the flat and the hierarchical
dispatcher; sequence 64-256; micro-batch 1 and 2) is one `moeplan run --testbed -o` record. The
records split into a fit set (``fit/``: sequences 64 and 256) and a held-out set (``held-out/``: every
sequence-128 run and the micro-batch-2 runs, i.e. shapes the fit never saw), for
`moeplan calibrate --runs runs/fit --held-out runs/held-out --cluster runs/testbed.yaml`.
Do not run anything else CPU-heavy meanwhile: the step times are what is being recorded.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

MATRIX: list[dict[str, object]] = [
    {"ep": ep, "dispatcher": d, "seq_len": s, "mbs": 1}
    for ep, d in ((1, "alltoall"), (2, "alltoall"), (4, "alltoall"), (4, "hierarchical"))
    for s in (64, 128, 256)
] + [
    {"ep": 4, "dispatcher": "alltoall", "seq_len": 128, "mbs": 2},
    {"ep": 2, "dispatcher": "alltoall", "seq_len": 128, "mbs": 2},
]


def held_out(layout: dict[str, object]) -> bool:
    """Sequence 128 and micro-batch 2: shapes between and beside the fit's, which spans sequence 64-256."""
    return layout["seq_len"] == 128 or layout["mbs"] == 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", required=True, help="The testbed's probed profile.")
    parser.add_argument("--out", type=Path, required=True, help="Folder for fit/ and held-out/.")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    for layout in MATRIX:
        name = f"ep{layout['ep']}-{layout['dispatcher']}-seq{layout['seq_len']}-mbs{layout['mbs']}"
        target = args.out / ("held-out" if held_out(layout) else "fit") / f"{name}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        command = [
            "moeplan", "run", "--testbed", "--model", "tiny-moe", "--steps", str(args.steps),
            "--ep", str(layout["ep"]), "--dispatcher", str(layout["dispatcher"]), "--seq-len", str(layout["seq_len"]),
            "--mbs", str(layout["mbs"]), "--cluster", args.cluster, "-o", str(target), "--json",
        ]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        print(
            f"{name}: exit {done.returncode} in {time.perf_counter() - start:.1f} s -> {target}", flush=True
        )
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
