"""The checkpoint folder is checked before anything in it is read (issue 19 item 5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from planner.errors import SpecError
from planner.execution.checkpoint_dir import check_checkpoint_dir, latest_checkpoint


def _folder(tmp_path: Path, latest: str | None = "step-000004\n") -> Path:
    folder = tmp_path / "ckpt"
    (folder / "step-000004").mkdir(parents=True)
    folder.chmod(0o755)
    if latest is not None:
        (folder / "latest").write_text(latest)
    return folder


def test_latest_names_a_checkpoint_inside_the_folder(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    assert latest_checkpoint(folder) == folder / "step-000004"
    assert latest_checkpoint(_folder(tmp_path / "none", latest=None)) is None


@pytest.mark.parametrize(
    ("latest", "rule"),
    [
        ("/tmp/evil\n", "not a checkpoint of this folder"),
        ("../other/step-000004\n", "not a checkpoint of this folder"),
        ("step-000009\n", "which is not a checkpoint folder"),
    ],
)
def test_a_planted_latest_is_refused(tmp_path: Path, latest: str, rule: str) -> None:
    with pytest.raises(SpecError, match=rule):
        latest_checkpoint(_folder(tmp_path, latest))


def test_latest_as_a_link_and_an_open_folder_are_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path, latest=None)
    (tmp_path / "elsewhere").write_text("step-000004\n")
    (folder / "latest").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SpecError, match="not the one-line file"):
        latest_checkpoint(folder)
    open_folder = _folder(tmp_path / "open")
    open_folder.chmod(0o777)
    with pytest.raises(SpecError, match="writable by every user"):
        check_checkpoint_dir(open_folder)
    with pytest.raises(SpecError, match="is not a folder"):
        check_checkpoint_dir(folder / "step-000004" / ".." / ".." / "elsewhere")


def test_run_refuses_a_resume_with_nothing_to_resume_before_ranks_start(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    os.chmod(empty, 0o755)
    done = subprocess.run(
        [sys.executable, "-m", "planner", "run", "--model", "tiny-moe", "--nproc", "2", "--steps", "1",
         "--checkpoint-dir", str(empty), "--resume"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "holds no checkpoint to resume" in " ".join(
        w for w in done.stderr.split() if w != "│"
    )
