"""``solve --emit`` prints what ``emit`` prints, unwrapped at any terminal width (issue 18 item 5)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MOEPLAN = [sys.executable, "-m", "planner"]


def _run_both(*args: str, columns: int = 40) -> tuple[str, str]:
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "xterm"}
    done = subprocess.run([*MOEPLAN, *args], capture_output=True, text=True, env=env, check=True, timeout=300)
    return done.stdout, done.stderr


def _run(*args: str, columns: int = 40) -> str:
    return _run_both(*args, columns=columns)[0]


def test_solve_emit_is_emit_and_bash_reads_it(tmp_path: Path) -> None:
    """``moeplan solve --model 2x70B --emit megatron | bash -n`` passes, and stdout is byte for byte what
    ``moeplan emit`` prints of the same plan; the report a person reads is on stderr."""
    plan = tmp_path / "plan.json"
    snippet, report = _run_both("solve", "--model", "2x70B", "--emit", "megatron", "-o", str(plan))
    assert snippet == _run("emit", "--plan", str(plan), "--format", "megatron")
    assert "2x70B on a800-2x8" in report
    # Nothing wrapped at the 40 columns: every comment line is one line, the arguments one per line.
    assert all(
        line.startswith(("#", "export ", "MEGATRON_ARGS=(", "    --", ")")) for line in snippet.splitlines()
    )
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    subprocess.run(["bash", "-n"], input=snippet, text=True, check=True)


def test_solve_emit_refuses_json_beside_it() -> None:
    done = subprocess.run(
        [*MOEPLAN, "solve", "--model", "tiny-moe", "--emit", "megatron", "--json"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert "--json and --emit megatron both print on stdout" in " ".join(
        w for w in done.stderr.split() if w != "│"
    )


def test_emit_slurm_options_and_megatron_launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = tmp_path / "plan.json"
    _run("solve", "--model", "tiny-moe", "-o", str(plan))
    monkeypatch.chdir(tmp_path)
    script = _run(
        "emit", "--plan", "plan.json", "--format", "slurm", "--partition", "gpu", "--account", "proj",
        "--time", "2-00:00:00", "--cpus-per-task", "64", "--slurm-output", "logs/%x-%j.out",
    )  # fmt: skip
    for directive in ("--partition=gpu", "--account=proj", "--time=2-00:00:00", "--cpus-per-task=64",
                      "--exclusive", "--mem=0", "--output=logs/%x-%j.out"):  # fmt: skip
        assert f"#SBATCH {directive}\n" in script
    assert f"--plan {plan}" in script  # the plan's absolute path: the job starts elsewhere
    megatron = _run("emit", "--plan", "plan.json", "--format", "slurm", "--launch", "megatron")
    assert '"${MEGATRON_LM}/pretrain_gpt.py" "${MEGATRON_ARGS[@]}" "$@"' in megatron
    assert "MEGATRON_ARGS=(" in megatron and "-m planner run" not in megatron
    refused = subprocess.run(
        [*MOEPLAN, "emit", "--plan", "plan.json", "--format", "megatron", "--partition", "gpu"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode == 2 and "--partition apply to --format slurm" in " ".join(
        refused.stderr.split()
    )


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--time-limit", "0"),
        ("--time-limit", "-5"),
        ("--time-limit", "nan"),
        ("--gap", "-1"),
        ("--gap", "nan"),
    ],
)
def test_solver_options_out_of_range_exit_2(option: str, value: str) -> None:
    done = subprocess.run(
        [*MOEPLAN, "solve", "--model", "tiny-moe", option, value], capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    assert f"{option} ({float(value)})" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        ({"parallel": {"tp": 3}}, "tp (3) must divide num_attention_heads"),
        ({"parallel": {"ep": 3}}, "ep (3) must divide num_experts"),
        ({"parallel": {"layers_per_stage": [1, 1]}}, "layers_per_stage"),
        ({"model": {"name": "gpt-17"}}, "gpt-17"),
    ],
)
def test_emit_checks_the_plan_it_reads(
    tmp_path: Path, change: dict[str, dict[str, object]], rule: str
) -> None:
    plan = tmp_path / "plan.json"
    _run("solve", "--model", "tiny-moe", "-o", str(plan))
    document = json.loads(plan.read_text())
    for section, fields in change.items():
        document[section].update(fields)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(document))
    for fmt in ("torchrun", "megatron"):
        done = subprocess.run(
            [*MOEPLAN, "emit", "--plan", str(broken), "--format", fmt], capture_output=True, text=True
        )
        assert done.returncode == 2 and done.stdout == "", (fmt, done.stdout)
        assert rule in " ".join(word for word in done.stderr.split() if word != "│"), done.stderr


def test_the_same_solve_writes_the_same_bytes(tmp_path: Path) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    for path in (first, second):
        _run("solve", "--model", "tiny-moe", "-o", str(path))
    assert first.read_bytes() == second.read_bytes()
    assert json.loads(first.read_text())["solver"]["solve_time_s"] == 0.0
