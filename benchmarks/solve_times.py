"""Solver speed: whole-process wall time of ``moeplan solve`` and the ILP against exhaustive search.

Targets (issue 4): ``moeplan solve --model 2x70B`` on the default profile in under 1 s of wall time for
the whole process; DeepSeek-V3 on 2048 H800 in under 10 s. Issue 15 item 7: the 1T dense GPT of
Narayanan et al. 2021 (``benchmarks/data/gpt-1t.yaml``) on 3,072 A100s and DeepSeek-V3 on 2,048 H800,
each under 5 s and proven optimal. Prints solver status, gap and time, and the
ratio of ILP time to exhaustive time on the largest space both finish.

Usage: python benchmarks/solve_times.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from planner.catalog import load_cluster, load_model
from planner.schema import TrainingSpec
from planner.search import SearchOptions, solve

COMMANDS = {
    "2x70B on the default profile (a800-2x8)": ["solve", "--model", "2x70B", "--cluster", "a800-2x8", "--json"],
    "2x70B on a800-2x8 --nodes 4 (32 GPUs)": ["solve", "--model", "2x70B", "--cluster", "a800-2x8", "--nodes", "4",
                                               "--seq-len", "8192", "--gbs", "64", "--json"],
    "1T GPT (Narayanan 2021) on 3072 A100": ["solve", "--model", "benchmarks/data/gpt-1t.yaml", "--cluster", "dgx-a100",
                                             "--nodes", "384", "--gbs", "3072", "--seq-len", "2048", "--json"],
    "DeepSeek-V3 on h800-dsv3 (2048 H800)": ["solve", "--model", "deepseek-v3", "--cluster", "h800-dsv3",
                                             "--gbs", "15360", "--precision", "fp8", "--json"],
}  # fmt: skip


def whole_process() -> None:
    print(f"{'moeplan solve ...':44s} {'wall s':>7s} {'exit':>4s}  solver")
    for label, args in COMMANDS.items():
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "planner", *args], capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode == 0:
            solver = json.loads(done.stdout)["solver"]
            detail = f"{solver['status']}, optimal={solver['optimal']}, gap={solver['gap']}, {solver['candidates']:,} layouts"
        else:
            detail = "no plan: " + " ".join(done.stderr.replace("│", " ").split())[:110] + "..."
        print(f"{label:44s} {wall:7.2f} {done.returncode:4d}  {detail}")


def ilp_against_exhaustive() -> None:
    model, cluster = load_model("qwen3-30b-a3b"), load_cluster("dgx-h100", 4)
    training = TrainingSpec(global_batch=128)
    options = SearchOptions(
        fixed=(("pp", 4), ("tp", 1)),
        virtual_stages=(1,),
        micro_batches=(1,),
        recompute=(("none", ()), ("full", ())),
        overlap=(False,),
    )
    start = time.perf_counter()
    ilp = solve(model, training, cluster, options)
    ilp_s = time.perf_counter() - start
    start = time.perf_counter()
    brute = solve(model, training, cluster, options, exhaustive=True, time_limit_s=3600)
    brute_s = time.perf_counter() - start
    assert ilp.plan.estimate is not None and brute.plan.estimate is not None
    print(
        f"qwen3-30b-a3b on 32 H100, pp4 ({ilp.layouts} layouts, 16,215 stage assignments each): ILP {ilp_s:.2f} s, "
        f"exhaustive {brute_s:.2f} s, ratio {ilp_s / brute_s:.3f}; same optimum: "
        f"{abs(ilp.plan.estimate.step_time_s - brute.plan.estimate.step_time_s) < 1e-9 * brute.plan.estimate.step_time_s}"
    )


if __name__ == "__main__":
    whole_process()
    ilp_against_exhaustive()
