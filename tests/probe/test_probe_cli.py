"""`moeplan probe` as a user runs it: local gloo ranks, under torchrun, and its input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from planner.catalog import load_cluster
from planner.cli import app

runner = CliRunner()


def moeplan(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "planner", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "160"},
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--nproc N"),
        (["--nproc", "1"], "at least 2"),
        (["--nproc", "2", "--budget", "0"], "--budget"),
        (["--nproc", "2", "--gpu", "H1OO"], "H100"),
        (["--nproc", "2", "--backend", "nccl"], "--backend gloo"),
    ],
)
def test_probe_input_errors(args: list[str], message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    result = runner.invoke(app, ["probe", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.slow
@pytest.mark.dist
def test_probe_four_local_gloo_ranks_within_budget_then_solve(tmp_path: Path) -> None:
    budget = 45
    done = moeplan("probe", "--nproc", "4", "--backend", "gloo", "-o", "p.yaml", "--budget", str(budget), "--json",
                   cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["nodes"], summary["ranks"]) == (1, 4)
    assert summary["elapsed_s"] <= budget
    (link,) = summary["links"]
    assert link["class"] == "intra_node" and link["bandwidth_gbps"] > 0 and link["latency_us"] > 0
    profile = load_cluster(str(tmp_path / "p.yaml"))
    assert profile.provenance.kind == "probe" and profile.provenance.library_versions["torch"]
    assert (Path(os.environ["MOEPLAN_HOME"]) / "last-probe.yaml").read_text() == (
        tmp_path / "p.yaml"
    ).read_text()

    solved = moeplan("solve", "--cluster", "p.yaml", "--model", "tiny-moe", "--seq-len", "512", "--gbs", "16",
                     "--json", cwd=tmp_path)  # fmt: skip
    assert solved.returncode == 0, solved.stderr
    plan = json.loads(solved.stdout)
    assert (plan["cluster"]["source"], plan["cluster"]["path"]) == ("file", "p.yaml") and plan["solver"][
        "optimal"
    ]
    assert (
        plan["parallel"]["tp"] * plan["parallel"]["pp"] * plan["parallel"]["dp"] * plan["parallel"]["cp"] == 4
    )


@pytest.mark.slow
@pytest.mark.dist
def test_probe_under_torchrun(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "planner",
            "probe",
            "--budget",
            "30",
            "-o",
            "tr.yaml",
            "--json",
        ],  # fmt: skip
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # only rank 0 prints
    assert (summary["nodes"], summary["ranks"], summary["backend"]) == (1, 2, "gloo")
    assert load_cluster(str(tmp_path / "tr.yaml")).num_gpus_per_node == 2


@pytest.mark.dist
def test_a_rank_that_dies_stops_the_probe_with_its_log(tmp_path: Path) -> None:
    import time

    from planner.errors import ExecutionError
    from planner.execution.launcher import RankPlacement
    from planner.probe.probe_options import ProbeOptions
    from planner.workflows.probe import launch

    # Rank 1's command is `false ...`: it exits 1 at once while rank 0 waits at rendezvous.
    placement = RankPlacement(
        prefixes=((), ("false",)), master_addr="127.0.0.1", interface="lo", ranks_per_node=2
    )
    options = ProbeOptions(backend="gloo", budget_s=30, started=time.time(), command="test")
    start = time.time()
    with pytest.raises(ExecutionError, match="rank 1 exited with code 1"):
        launch(options, placement)
    assert time.time() - start < 20
