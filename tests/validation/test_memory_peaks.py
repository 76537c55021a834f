"""Predicted peak memory against published peaks (issue 16): ``benchmarks/data/memory-peaks.yaml``.

Every peak is PyTorch's ``max_memory_allocated`` of a run with its gradient and optimizer precision stated,
scored against the predicted peak less the reserve, on the rank the source reports. Nothing is fitted to
this file: it is held out from every constant of the cost model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from planner.accuracy.validate import ValidationReport, validate_suite
from planner.accuracy.validation_file import load_validation_file

PEAKS = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "memory-peaks.yaml"
WITHIN = 0.10
"""Issue 16's target: predicted peaks within 10% of published ones."""
KNOWN_OUTSIDE = {
    # Moonlight-16B-A3B, 8 H100 (Megatron-Bridge's recompute study): under-predicted by 13-16% once the
    # recipe's BF16 gradients and moments are priced. Not explained yet: candidates are the routing
    # imbalance of the first iterations, MLA intermediates and transients at the peak (issue 16 note);
    # finding it needs a memory snapshot, not a fitted constant.
    "MB-MOON-MEM-NONE": (-0.20, -0.10),
    "MB-MOON-MEM-COREATTN": (-0.20, -0.10),
    "MB-MOON-MEM-UPPROJ": (-0.20, -0.10),
    "MB-MOON-MEM-UPPROJ-MLP": (-0.20, -0.10),
    "MB-MOON-MEM-MOEACT": (-0.20, -0.10),
    "MB-MOON-MEM-LN-MOEACT": (-0.20, -0.10),
}
"""Cases outside the target, each with the error range it has today: a change either way fails."""


@pytest.fixture(scope="module")
def report() -> ValidationReport:
    return validate_suite(load_validation_file(PEAKS))


def test_no_run_that_ran_is_predicted_out_of_memory(report: ValidationReport) -> None:
    assert report.false_oom == () and report.oom_unless_unstated == () and report.missed_oom == ()


def test_every_case_reports_a_peak_and_states_its_optimizer(report: ValidationReport) -> None:
    suite = load_validation_file(PEAKS)
    assert all(c.measured.peak_memory_gib is not None for c in suite.cases)
    assert not any(c.parallel.unstated_model_state for c in suite.cases)
    assert len(suite.cases) >= 4


@pytest.mark.parametrize("case_id", [c.id for c in load_validation_file(PEAKS).cases])
def test_predicted_peak_is_within_ten_percent(report: ValidationReport, case_id: str) -> None:
    case = next(c for c in report.cases if c.id == case_id)
    assert case.memory_error is not None
    if case_id in KNOWN_OUTSIDE:
        low, high = KNOWN_OUTSIDE[case_id]
        assert low <= case.memory_error <= high, case.memory_error
    else:
        assert abs(case.memory_error) <= WITHIN, case.memory_error
