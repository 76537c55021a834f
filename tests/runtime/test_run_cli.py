"""`moeplan run` as a user runs it: the JSON record, the prediction beside it, and input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from planner.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "tiny-moe"], "--nproc N"),
        (
            ["--model", "tiny-moe", "--nproc", "4", "--pp", "2", "--gbs", "2"],
            "at least as many micro-batches",
        ),
        (
            ["--model", "tiny-moe", "--nproc", "4", "--pp", "2", "--vpp", "4"],
            "must divide the model's 4 layers",
        ),
        (["--model", "tiny-moe", "--nproc", "4", "--cp", "2", "--seq-len", "30"], "multiple of 2 x cp = 4"),
        (["--model", "tiny-moe", "--nproc", "4", "--ep", "3"], "ep"),
        (["--model", "tiny-moe", "--nproc", "3", "--tp", "3"], "tp (3) must divide"),
        (
            [
                "--model",
                "tiny-moe",
                "--nproc",
                "4",
                "--tp",
                "2",
                "--dispatcher",
                "monta",
                "--sequence-parallel",
            ],
            "--no-sequence-parallel",
        ),
        (
            ["--model", "tiny-moe", "--nproc", "4", "--tp", "2", "--sequence-parallel", "--seq-len", "33"],
            "sequence length (33)",
        ),
        (["--model", "tiny-moe", "--nproc", "4", "--ranks-per-node", "3"], "--ranks-per-node (3)"),
        (["--nproc", "2"], "--model"),
        (["--model", "tiny-moe", "--nproc", "4", "--gbs", "3"], "multiple of dp"),
        (["--model", "tiny-moe", "--nproc", "2", "--timeout", "0"], "timeout_s"),
        (["--model", "tiny-moe", "--nproc", "2", "--resume"], "--checkpoint-dir"),
    ],
)
def test_run_input_errors(args: list[str], message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    result = runner.invoke(app, ["run", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.dist
@pytest.mark.slow
def test_run_json_has_the_record_and_the_prediction(tmp_path: Path) -> None:
    # A 4-rank profile first (the prediction needs a cluster of the run's size), then the run.
    env = {**os.environ, "MOEPLAN_HOME": str(tmp_path / "home")}

    def moeplan(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "planner", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300, check=False)  # fmt: skip

    probe = moeplan("probe", "--nproc", "4", "--budget", "30", "-o", "p.yaml")
    assert probe.returncode == 0, probe.stderr[-2000:]
    done = moeplan("run", "--model", "tiny-moe", "--nproc", "4", "--tp", "2", "--ep", "2", "--dispatcher", "monta",
                   "--steps", "3", "--cluster", "p.yaml", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert [s["step"] for s in report["steps"]] == [0, 1, 2]
    assert all(s["loss"] > 0 and s["time_s"] > 0 for s in report["steps"])
    assert set(report["bytes_per_link_class"]) == {"intra_node", "inter_node"}
    assert report["bytes_per_collective"]["dispatch"] > 0 and "all_gather" in report["bytes_per_collective"]
    assert report["collectives"]["dispatch"] > 0
    assert report["peak_memory_bytes"] > 0
    assert report["predicted"]["step_time_s"] > 0, report["prediction_note"]
    assert report["parallel"]["dispatcher"]["kind"] == "monta"


@pytest.mark.dist
def test_a_plan_of_its_own_model_runs_at_its_training_settings(tmp_path: Path) -> None:
    from planner.emit import load_plan, write_plan
    from planner.schema import DispatcherSpec, ParallelConfig, TrainingSpec

    golden = Path(__file__).resolve().parents[2] / "examples" / "golden" / "tiny-moe-v100-pcie.plan.json"
    plan = load_plan(golden).model_copy(
        update={
            "num_gpus": 2,
            "num_nodes": 1,
            "num_gpus_per_node": 2,
            "parallel": ParallelConfig.for_world(
                2, ep=2, recompute="full", dispatcher=DispatcherSpec(kind="allgather")
            ),
            "training": TrainingSpec(seq_len=32, global_batch=4),
            "estimate": None,
        }
    )
    write_plan(tmp_path / "plan.json", plan)
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    done = subprocess.run(
        [sys.executable, "-m", "planner", "run", "--plan", "plan.json", "--steps", "2", "-o", "r.json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "r.json").read_text())
    assert (record["training"]["seq_len"], record["training"]["global_batch"]) == (32, 4)
    assert record["world_size"] == 2 and record["format"] == "moeplan-run/1"
    # What the runtime does not implement is named in the record and on screen, never dropped silently.
    ignored = {entry["field"]: entry for entry in record["ignored_plan_fields"]}
    assert (
        ignored["parallel.recompute"]["value"] == "full" and ignored["parallel.recompute"]["runs"] == "none"
    )
    assert "training.precision" in ignored and "parallel.distributed_optimizer" in ignored
    assert "parallel.recompute 'full' is not run" in " ".join(done.stderr.replace("│", " ").split())
    # Without a terminal, progress is plain lines on stderr: the start-up stages, the first step, the end.
    for stage in (
        "2 ranks started",
        "2 ranks joined: building the model",
        "step 1 of 2",
        "all 2 ranks exited",
    ):
        assert f"moeplan run: {stage}" in done.stderr, done.stderr[-3000:]
    assert record["parallel"]["recompute"] == "none"  # what ran, and what the prediction priced
    # The plan's dispatcher runs (it used to be replaced by the all-to-all without a word).
    assert (
        record["parallel"]["dispatcher"]["kind"] == "allgather"
        and record["bytes_per_collective"]["dispatch"] > 0
    )
    strict = subprocess.run(
        [sys.executable, "-m", "planner", "run", "--plan", "plan.json", "--steps", "2", "--strict"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert strict.returncode == 2 and "--strict" in strict.stderr and "Traceback" not in strict.stderr


@pytest.mark.dist
@pytest.mark.slow
def test_run_interleaved_pipeline_from_the_command_line(tmp_path: Path) -> None:
    env = {**os.environ, "MOEPLAN_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, "-m", "planner", "run", "--model", "tiny-moe", "--nproc", "2", "--pp", "2", "--vpp", "2",
         "--steps", "2", "--seq-len", "32", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["parallel"]["pp"] == 2 and report["parallel"]["vpp"] == 2
    # Default batch: pp micro-batches per data-parallel rank; 4 chunks, 3 boundaries, both directions.
    assert report["training"]["global_batch"] == 2
    assert report["bytes_per_collective"]["pp_p2p"] == 2 * 3 * 2 * 32 * 256 * 4
    assert all(s["loss"] > 0 for s in report["steps"])
