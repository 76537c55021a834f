"""``moeplan run`` as one rank of a torchrun job: the way the emitted torchrun command and Slurm script start it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from planner.emit import load_plan, write_plan
from planner.schema import DispatcherSpec, ParallelConfig

CALIBRATION = Path(__file__).resolve().parents[1] / "data" / "calibration"
TORCHRUN = Path(sys.executable).with_name("torchrun")
MOEPLAN = [sys.executable, "-m", "planner"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@pytest.mark.dist
def test_run_under_torchrun_reports_once_from_rank_0(tmp_path: Path) -> None:
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "planner", "run", "--model", "tiny-moe",
               "--ep", "2", "--steps", "3", "-o", "record.json", "--json"]  # fmt: skip
    done = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False, env=_env()
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # only rank 0 prints
    assert (report["world_size"], report["ranks_per_node"], report["backend"]) == (2, 2, "gloo")
    assert report["parallel"]["ep"] == 2 and [s["step"] for s in report["steps"]] == [0, 1, 2]
    assert json.loads((tmp_path / "record.json").read_text()) == report


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.skipif(shutil.which("bash") is None, reason="the emitted script is a bash command")
def test_the_emitted_torchrun_command_runs_the_plan(tmp_path: Path) -> None:
    profile = CALIBRATION / "testbed.yaml"  # 2 nodes x 2 CPU ranks, probed
    solve = [*MOEPLAN, "solve", "--model", "tiny-moe", "--cluster", str(profile), "--seq-len", "64", "--gbs", "8",
             "--dispatcher", "alltoall", "-o", "plan.json"]  # fmt: skip
    subprocess.run(solve, cwd=tmp_path, check=True, capture_output=True, env=_env())
    # A layout quick to run on two cores: keep the solved plan's document (its node shape: 2 nodes x 2),
    # as a user would by editing the plan.
    solved = load_plan(tmp_path / "plan.json")
    assert (solved.num_nodes, solved.num_gpus_per_node) == (2, 2)
    layout = ParallelConfig.for_world(
        solved.num_gpus, ep=solved.num_gpus, dispatcher=DispatcherSpec(kind="alltoall")
    )
    write_plan(tmp_path / "plan.json", solved.model_copy(update={"parallel": layout, "estimate": None}))
    plan = json.loads((tmp_path / "plan.json").read_text())
    p = plan["parallel"]
    script = subprocess.run(
        [*MOEPLAN, "emit", "--plan", "plan.json", "--format", "torchrun"],
        cwd=tmp_path, check=True, capture_output=True, text=True, env=_env(),
    ).stdout  # fmt: skip
    # The plan by its absolute path: the script runs wherever the scheduler starts it.
    where = f"--plan {tmp_path / 'plan.json'}"
    assert f"-m planner run {where}" in script and "--nnodes 2" in script and "--nproc-per-node 2" in script
    # The script as a user runs it, once per node: here both "nodes" on this host, meeting at the c10d
    # rendezvous on the loopback address (the second agent finds the store taken and joins as a client).
    script = script.replace(where, f"{where} --steps 3 --json")
    nodes = [
        subprocess.Popen(
            ["bash", "-c", "MASTER_ADDR=127.0.0.1\n" + script],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**_env(), "PATH": f"{TORCHRUN.parent}:{os.environ['PATH']}"},
        )  # fmt: skip
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [err[-3000:] for _, err in outputs]
    (report,) = [json.loads(out) for out, _ in outputs if out.strip()]  # rank 0's node alone reports
    assert report["world_size"] == plan["num_gpus"] and report["ranks_per_node"] == 2
    assert (report["parallel"]["tp"], report["parallel"]["ep"]) == (p["tp"], p["ep"])
