"""The eight dense Megatron runs of Korthikanti et al. 2022 Table 5 (``benchmarks/data/korthikanti-table5.yaml``),
held out: no fitting script reads the file, so its error is a held-out figure. Issue 17's target is 5% mean
error; the bound below is what the cost model reaches today, so a change that loses accuracy here fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from planner.accuracy.validate import ValidationReport, validate_suite
from planner.accuracy.validation_file import load_validation_file

REPO = Path(__file__).resolve().parents[2]
TABLE5 = REPO / "benchmarks" / "data" / "korthikanti-table5.yaml"
MAPE_BOUND = 0.05
"""Issue 17's target. Today's mean error is 4.9% (-5.4% to +9.6%), with the A100's measured GEMM curve."""


@pytest.fixture(scope="module")
def report() -> ValidationReport:
    return validate_suite(load_validation_file(TABLE5))


def test_no_fit_reads_the_file() -> None:
    # The fit script scores the file after fitting (a locked file: tests/validation/test_locked.py); the files
    # it fits to are recorded with their hashes, and this one is not among them.
    from planner.costmodel.framework_fit import fit_results

    fit = fit_results()
    fitted = {fit["dense"]["file"], fit["moe"]["file"]}
    assert not any("korthikanti" in name for name in fitted)
    gemm_fit = (REPO / "benchmarks" / "fit_gemm_efficiency.py").read_text()
    assert "korthikanti" not in gemm_fit.lower()


def test_all_eight_runs_are_predicted_within_the_bound(report: ValidationReport) -> None:
    assert len(report.cases) == 8 and all(c.fits for c in report.cases)
    assert report.mape is not None and report.mape <= MAPE_BOUND, report.mape
    assert all(abs(c.error) < 0.10 for c in report.cases if c.error is not None)


def test_selective_recompute_is_faster_in_every_model(report: ValidationReport) -> None:
    """Each size's two runs differ only in recompute and sequence parallelism: the measured order holds."""
    assert len(report.groups) == 4 and all(g.top1_match for g in report.groups)


@pytest.mark.parametrize("size", ["22B", "175B", "530B", "1T"])
def test_full_recompute_runs_the_tp_collectives_again(report: ValidationReport, size: str) -> None:
    full = next(c for c in report.cases if c.id == f"KORT-{size}-FULL")
    terms = {t.name: t.total_s for t in full.estimate.breakdown}
    assert terms["tp_comm_recompute"] == pytest.approx(terms["tp_comm"] / 2)
