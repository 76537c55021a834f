"""The locked files (issue 17 item 1): published runs that no fit reads, from sources the fitted files do not
cite, scored by ``benchmarks/fit_framework_overheads.py`` after it has chosen its figures. Their error is held
out by construction; the READMEs quote it from the fit's file, and ``moeplan validate`` says so."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from planner.accuracy.validate import validate_suite
from planner.accuracy.validation_file import load_validation_file
from planner.costmodel.framework_fit import fit_results
from planner.workflows.validate import validate_file
from tests.conftest import REPO

FIT_SCRIPT = REPO / "benchmarks" / "fit_framework_overheads.py"
LOCKED_MOE = REPO / "benchmarks" / "data" / "locked-moe.yaml"
TABLE5 = REPO / "benchmarks" / "data" / "korthikanti-table5.yaml"
ROUNDING = 5e-5
"""The fit file keeps errors to 4 decimals."""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _entry(path: Path) -> dict[str, object]:
    return next(held for held in fit_results()["locked"] if held["file"] == str(path.relative_to(REPO)))


def test_the_locked_files_are_scored_and_never_fitted() -> None:
    fit = fit_results()
    fitted = {fit["dense"]["sha256"], fit["moe"]["sha256"]}
    locked = {held["file"] for held in fit["locked"]}
    assert locked == {"benchmarks/data/korthikanti-table5.yaml", "benchmarks/data/locked-moe.yaml"}
    for path in (TABLE5, LOCKED_MOE):
        assert _sha(path) not in fitted
        assert _entry(path)["sha256"] == _sha(path), (
            f"{path.name} changed since the fit scored it: rerun the fit"
        )


def test_the_fit_script_refuses_to_fit_a_locked_file(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(FIT_SCRIPT), "--moe", str(LOCKED_MOE)],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 2 and "locked file is held out" in done.stderr


@pytest.mark.parametrize("path", [TABLE5, LOCKED_MOE], ids=lambda p: p.name)
def test_validate_reports_the_score_the_fit_recorded(path: Path) -> None:
    entry = _entry(path)
    report = validate_suite(load_validation_file(path))
    assert len([c for c in report.cases if c.error is not None]) == entry["runs"]
    assert report.mape == pytest.approx(entry["mape"], abs=ROUNDING)
    assert report.top1_groups == (entry["best_first"], entry["groups_ranked"])
    assert report.pairs == entry["pairs"]


def test_validate_calls_a_locked_file_held_out() -> None:
    locked = validate_file(LOCKED_MOE, with_solve=False).to_json()
    assert locked["locked"] is True and locked["fitted_here"] is None
    assert (
        validate_file(REPO / "benchmarks" / "data" / "dense-h100.yaml", with_solve=False).to_json()["locked"]
        is False
    )


def test_the_locked_moe_error_does_not_grow() -> None:
    """Today's held-out figure on runs unlike the fit's: 40.8%, the best run first in 1 of 5 groups (three groups
    hold a run the model ties with a slower one; a tie with a slower run is not a match), 10.5 of 14
    pairs ordered right. Issue 17 asks for 12% and 85%. A change that loses accuracy here fails; one that gains
    moves the bounds."""
    report = validate_suite(load_validation_file(LOCKED_MOE))
    assert report.mape <= 0.42, report.mape
    assert report.top1_groups[0] >= 1, report.top1_groups
    assert report.pairwise_accuracy >= 0.75, report.pairwise_accuracy
