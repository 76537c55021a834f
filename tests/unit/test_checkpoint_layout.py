"""A resume must match the layout its checkpoint records, and old checkpoints are pruned (issue 19 item 5):
the torch-free check and selection, and the refusal as `moeplan run` gives it before any rank starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from planner.catalog import load_model
from planner.errors import SpecError
from planner.execution.checkpoint_dir import LAYOUT, check_resume, checkpoint_layout, prunable
from planner.schema import ParallelConfig
from planner.workflows.run_request import RUNTIME_LIMITS


def _as_run(**settings: object) -> ParallelConfig:
    """A layout as `moeplan run` runs it: what the runtime does not implement replaced (RUNTIME_LIMITS)."""
    document = ParallelConfig.model_validate(settings).model_dump(mode="json")
    for field, limit in RUNTIME_LIMITS.items():
        *parents, leaf = field.split(".")
        if parents[0] == "parallel":
            node = document
            for key in parents[1:]:
                node = node[key]
            node[leaf] = limit.runs
    return ParallelConfig.model_validate(document)


FOUR_RANKS_EP2 = _as_run(dp=4, ep=2, edp=2)


def _layout(parallel: ParallelConfig = FOUR_RANKS_EP2, name: str = "tiny-moe", **model: object) -> dict:
    spec = load_model("tiny-moe").model_copy(update=model)
    return checkpoint_layout(name, spec, parallel)


def _folder(tmp_path: Path, layout: dict | None) -> Path:
    """A checkpoint folder whose ``latest`` names step-000002, recording ``layout`` (None: no record)."""
    folder = tmp_path / "ck"
    (folder / "step-000002").mkdir(parents=True)
    os.chmod(folder, 0o755)
    (folder / "latest").write_text("step-000002\n")
    if layout is not None:
        (folder / "step-000002" / LAYOUT).write_text(json.dumps(layout))
    return folder


def test_the_same_layout_resumes(tmp_path: Path) -> None:
    folder = _folder(tmp_path, _layout())
    assert check_resume(folder, _layout()) == folder / "step-000002"
    # What describes the model without shaping it need not match: a catalog name and a file of it.
    assert check_resume(folder, _layout(name="models/tiny.yaml", notes="mine", source="a file"))


@pytest.mark.parametrize(
    ("ours", "said"),
    [
        (
            _layout(_as_run(dp=2, ep=1, edp=2)),
            "written by 4 ranks with dp 4, ep 2; this run has 2 ranks with dp 2, ep 1.",
        ),
        (
            _layout(_as_run(dp=4, ep=1, edp=4)),
            "4 ranks with edp 2, ep 2; this run has 4 ranks with edp 4, ep 1",
        ),
        (
            _layout(_as_run(dp=4, ep=2, edp=2, dispatcher={"kind": "hierarchical"})),
            "dispatcher.kind alltoall; this run has 4 ranks with dispatcher.kind hierarchical",
        ),
        (
            _layout(hidden_size=128),
            "with model hidden_size 256; this run has 4 ranks with model hidden_size 128",
        ),
    ],
)
def test_another_layout_is_refused_naming_what_differs(tmp_path: Path, ours: dict, said: str) -> None:
    folder = _folder(tmp_path, _layout())
    with pytest.raises(SpecError, match="continues a run on its own layout") as refused:
        check_resume(folder, ours)
    assert said in str(refused.value)


def test_a_checkpoint_without_its_record_is_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path, None)
    with pytest.raises(SpecError, match="has no readable layout.json.*not written by this moeplan"):
        check_resume(folder, _layout())
    record = folder / "step-000002" / LAYOUT
    record.write_text("{not json")
    with pytest.raises(SpecError, match="is not JSON"):
        check_resume(folder, _layout())
    record.write_text(json.dumps({"world_size": 4}))
    with pytest.raises(SpecError, match="not a moeplan-checkpoint-layout/1 record"):
        check_resume(folder, _layout())
    record.unlink()
    (tmp_path / "elsewhere.json").write_text(json.dumps(_layout()))
    record.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(SpecError, match="is a link"):
        check_resume(folder, _layout())


STEPS = [f"step-{s:06d}" for s in (9, 19, 29, 39, 49)]


@pytest.mark.parametrize(
    ("keep", "removed"),
    [(1, STEPS[:4]), (2, STEPS[:3]), (5, []), (9, [])],
)
def test_pruning_keeps_the_newest(keep: int, removed: list[str]) -> None:
    assert prunable(STEPS, "step-000049", keep) == removed


def test_pruning_removes_crashed_saves_and_nothing_else() -> None:
    names = [*STEPS, ".step-000003.partial", "notes", "step-1", "step-000019.bak", ".step-000019.partial.x"]
    assert prunable(names, "step-000029", 2) == ["step-000009", ".step-000003.partial"]
    with pytest.raises(ValueError, match="at least 1"):
        prunable(names, "step-000029", 0)


def _moeplan_run(folder: Path, *layout: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "planner", "run", "--model", "tiny-moe", "--steps", "5", "--seq-len", "32",
         "--checkpoint-dir", str(folder), "--resume", *layout],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "400"},
    )  # fmt: skip
    return done.returncode, " ".join(w for w in done.stderr.split() if w != "│")


def test_run_refuses_a_resume_on_another_layout_before_ranks_start(tmp_path: Path) -> None:
    folder = _folder(tmp_path, _layout())
    code, said = _moeplan_run(folder, "--nproc", "2", "--ranks-per-node", "2")
    assert code == 2, said
    assert "written by 4 ranks with dp 4, ep 2; this run has 2 ranks with dp 2, ep 1" in said
    assert "ranks started" not in said and "Traceback" not in said
    (folder / "latest").write_text("step-000007\n")
    code, said = _moeplan_run(folder, "--nproc", "4", "--ep", "2", "--ranks-per-node", "2")
    assert code == 2 and "names step-000007, which is not a checkpoint folder" in said, said
