"""``moeplan calibrate`` as a user runs it: on recorded testbed runs, and end to end from fresh runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from planner.catalog import load_cluster
from tests.cli.invoke import invoke

DATA = Path(__file__).resolve().parents[1] / "data" / "calibration"


def test_calibrate_recorded_testbed_runs(tmp_path: Path) -> None:
    output = tmp_path / "calibrated.yaml"
    args = [
        "--runs",
        str(DATA / "fit"),
        "--held-out",
        str(DATA / "held-out"),
        "--cluster",
        str(DATA / "testbed.yaml"),
    ]
    code, stdout, stderr = invoke("calibrate", *args, "-o", str(output), "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["held_out"]["mape_after"] < report["held_out"]["mape_before"]
    assert report["fit"]["mape_after"] < report["fit"]["mape_before"]
    assert {row["set"] for row in report["runs"]} == {"fit", "held-out"}
    calibrated = load_cluster(str(output))  # the written profile is a valid profile
    assert "moeplan calibrate" in calibrated.provenance.source
    code, text, _ = invoke("calibrate", *args, "-o", str(tmp_path / "again.yaml"))
    assert code == 0 and "held-out runs" in text and "mean absolute error" in text
    assert (tmp_path / "again.yaml").read_bytes() == output.read_bytes()


def test_calibrate_bad_input(tmp_path: Path) -> None:
    code, _, stderr = invoke(
        "calibrate", "--runs", str(tmp_path), "--cluster", "a800-2x8", "-o", str(tmp_path / "x.yaml")
    )
    assert code == 2 and "holds no run records" in " ".join(stderr.replace("│", " ").split())
    assert not (tmp_path / "x.yaml").exists()


@pytest.mark.slow
@pytest.mark.dist
def test_probe_run_calibrate_end_to_end(tmp_path: Path) -> None:
    """From nothing: probe 4 local ranks (one node), record runs, calibrate on some, check on the rest."""
    moeplan = [sys.executable, "-m", "planner"]
    profile = tmp_path / "local.yaml"
    probed = subprocess.run(
        [*moeplan, "probe", "--nproc", "4", "--budget", "30", "-o", str(profile)],
        capture_output=True,
        text=True,
    )
    assert probed.returncode == 0, probed.stderr[-3000:]
    layouts = {"fit": [("1", "64"), ("4", "64"), ("2", "128")], "held-out": [("4", "128")]}
    for part, cases in layouts.items():
        for ep, seq in cases:
            record = tmp_path / part / f"ep{ep}-seq{seq}.json"
            record.parent.mkdir(exist_ok=True)
            ran = subprocess.run(
                [*moeplan, "run", "--nproc", "4", "--model", "tiny-moe", "--steps", "4",
                 "--ep", ep, "--seq-len", seq, "--cluster", str(profile), "-o", str(record)],
                capture_output=True, text=True,
            )  # fmt: skip
            assert ran.returncode == 0, ran.stderr[-3000:]
            assert json.loads(record.read_text())["format"] == "moeplan-run/1"
    done = subprocess.run(
        [*moeplan, "calibrate", "--runs", str(tmp_path / "fit"), "--held-out", str(tmp_path / "held-out"),
         "--cluster", str(profile), "-o", str(tmp_path / "calibrated.yaml"), "--json"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    report = json.loads(done.stdout)
    # On this 2-core host the fit must at least not worsen the runs it was fitted to.
    assert report["fit"]["mape_after"] <= report["fit"]["mape_before"]
    assert load_cluster(str(tmp_path / "calibrated.yaml")).num_gpus_per_node == 4
