"""Start-up cost of the planning CLI: wall time of `moeplan` commands as a user runs them.

The solver issue targets `moeplan solve --model 2x70B` in under 1 s of wall time for the whole
process, so the fixed cost of starting moeplan (interpreter, imports, catalog loading) is measured
here on its own. Prints the median of N runs of each command, in milliseconds.

Usage: python benchmarks/startup.py [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass (interpreter only)": [sys.executable, "-c", "pass"],
    "import planner": [sys.executable, "-c", "import planner"],
    "moeplan --version": [sys.executable, "-m", "planner", "--version"],
    "moeplan models --json": [sys.executable, "-m", "planner", "models", "--json"],
    "moeplan clusters --json": [sys.executable, "-m", "planner", "clusters", "--json"],
    "moeplan show cluster h800-dsv3 --json": [
        sys.executable,
        "-m",
        "planner",
        "show",
        "cluster",
        "h800-dsv3",
        "--json",
    ],
    "moeplan solve --model 2x70B (the whole solve)": [
        sys.executable,
        "-m",
        "planner",
        "solve",
        "--model",
        "2x70B",
    ],
}


def median_ms(command: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    print(f"{'command':48s} {'median ms':>10s}   ({args.runs} runs each)")
    for label, command in COMMANDS.items():
        print(f"{label:48s} {median_ms(command, args.runs):10.0f}")


if __name__ == "__main__":
    main()
