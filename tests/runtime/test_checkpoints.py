"""Old checkpoints are pruned, and a resume on another layout than its checkpoint's is refused before any
rank starts (issue 19 item 5), as a user meets them with `moeplan run`. One 50-step run serves every test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.dist, pytest.mark.slow]

LAYOUT = ["--model", "tiny-moe", "--seq-len", "32", "--ranks-per-node", "2"]
FOUR_RANKS_EP2 = ["--nproc", "4", "--ep", "2"]


def moeplan(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "planner", "run", *LAYOUT, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, check=False, env={**os.environ, "COLUMNS": "400"})  # fmt: skip


def said(done: subprocess.CompletedProcess[str]) -> str:
    """stderr as one line, without the error panel's borders."""
    return " ".join(w for w in done.stderr.split() if w != "│")


@pytest.fixture(scope="module")
def run_of_50_steps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 50-step run checkpointing every 10 steps (the default --keep-checkpoints, 2) into a folder that
    already holds a crashed save's staging folder, a link named like a checkpoint, and a file of the user's."""
    work = tmp_path_factory.mktemp("run")
    checkpoints = work / "ck"
    (checkpoints / ".step-000003.partial").mkdir(parents=True)
    os.chmod(checkpoints, 0o755)
    (work / "elsewhere").mkdir()
    (work / "elsewhere" / "kept").write_text("not moeplan's\n")
    (checkpoints / "step-000001").symlink_to(work / "elsewhere")
    (checkpoints / "notes").write_text("mine\n")
    done = moeplan(*FOUR_RANKS_EP2, "--steps", "50", "--checkpoint-dir", "ck", "--json", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    return work


def test_a_run_keeps_the_newest_checkpoints_only(run_of_50_steps: Path) -> None:
    checkpoints = run_of_50_steps / "ck"
    assert (checkpoints / "latest").read_text().strip() == "step-000049"
    folders = sorted(p.name for p in checkpoints.iterdir() if p.is_dir() and not p.is_symlink())
    assert folders == ["step-000039", "step-000049"]  # the crashed save's staging folder is gone too
    # Neither a link named like a checkpoint nor what it points at, nor a file of the user's, is removed.
    assert (checkpoints / "step-000001").is_symlink()
    assert (run_of_50_steps / "elsewhere" / "kept").read_text() == "not moeplan's\n"
    assert (checkpoints / "notes").exists()


@pytest.mark.parametrize(
    ("layout", "differs"),
    [
        (["--nproc", "2"], "dp 4, ep 2; this run has 2 ranks with dp 2, ep 1."),
        (["--nproc", "4", "--ep", "4"], "edp 2, ep 2; this run has 4 ranks with edp 1, ep 4."),
    ],
)
def test_a_resume_on_another_layout_is_refused_before_ranks_start(
    run_of_50_steps: Path, layout: list[str], differs: str
) -> None:
    done = moeplan(*layout, "--steps", "60", "--checkpoint-dir", "ck", "--resume", cwd=run_of_50_steps)
    assert done.returncode == 2, done.stderr[-3000:]
    assert (
        f"the checkpoint step-000049 in '{run_of_50_steps / 'ck'}' was written by 4 ranks with {differs}"
        in said(done)
    )
    assert "continues a run on its own layout" in said(done)
    assert "ranks started" not in done.stderr and "Traceback" not in done.stderr


def test_a_checkpoint_without_its_layout_record_is_refused(run_of_50_steps: Path) -> None:
    copy = run_of_50_steps / "copy"
    shutil.copytree(run_of_50_steps / "ck", copy, symlinks=True)
    (copy / "step-000049" / "layout.json").unlink()
    done = moeplan(
        *FOUR_RANKS_EP2, "--steps", "60", "--checkpoint-dir", "copy", "--resume", cwd=run_of_50_steps
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "has no readable layout.json" in said(done) and "not written by this moeplan" in said(done)
    assert "ranks started" not in done.stderr
