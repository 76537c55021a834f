"""The cost model against ../shared/validation/published.yaml (measured by others on real clusters), and
the fitted framework figures against the file their fit writes (``planner/costmodel/data/
framework_fit.json``): the constants the model uses, the errors the READMEs quote and ``moeplan
validate``'s figures must all be that file's, so none of them can drift from the others.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from planner.accuracy.validate import validate_suite
from planner.accuracy.validation_file import load_validation_file
from planner.costmodel import MEGATRON_CORE_EAGER
from planner.costmodel.framework_fit import DOCS_BEGIN, DOCS_END, fit_results, summary_markdown
from tests.conftest import REPO, SHARED_VALIDATION

DENSE = REPO / "benchmarks" / "data" / "dense-h100.yaml"
ROUNDING = 5e-5
"""The fit file keeps errors to 4 decimals."""


@pytest.fixture(scope="module")
def report(published: dict[str, Any]):  # type: ignore[no-untyped-def]
    return validate_suite(load_validation_file(SHARED_VALIDATION))


def test_every_group_ranks_its_best_measured_configuration_first(report) -> None:  # type: ignore[no-untyped-def]
    assert report.groups and all(group.top1_match for group in report.groups), [
        g.group for g in report.groups if not g.top1_match
    ]


def test_validate_reports_the_error_the_fit_recorded(report) -> None:  # type: ignore[no-untyped-def]
    moe = fit_results()["moe"]
    assert len(report.cases) == moe["runs"] and report.mape == pytest.approx(moe["mape_fitted"], abs=ROUNDING)


def test_every_case_is_predicted(report) -> None:  # type: ignore[no-untyped-def]
    assert all(case.predicted > 0 for case in report.cases)


def test_runs_that_ran_are_predicted_to_fit(report) -> None:  # type: ignore[no-untyped-def]
    # Every published run ran: none is a false OOM (issue 16's done-means). Six were predicted out of memory
    # until the MoE layer stopped counting the expert outputs Megatron-Core does not keep. Three still do not
    # fit with Megatron-LM's defaults for what the shared format cannot state, and fit with the lightest the
    # source leaves open, so validate reports them as such: one BF16 run with FP32 gradients and Adam state
    # (it fits with BF16 gradients and moments, the precision-aware optimizer: the Megatron-Bridge
    # DeepSeek-V3 recipe its notes name), two MXFP8 runs with BF16 parameters and Transformer Engine's cached
    # FP8 copies (they fit with FP8 parameters, which Megatron-Bridge's MXFP8 recipe sets).
    assert report.false_oom == () and report.missed_oom == ()
    unstated = ("MB-2511-DSV3-GB200-BF16", "MB-2511-DSV3-GB200-MXFP8", "MB-2608-DSV3-GB300")
    assert report.oom_unless_unstated == unstated
    for case in (c for c in report.cases if c.id in unstated):
        assert not case.fits and case.fits_if_unstated


def test_dense_runs_are_predicted_with_the_error_the_fit_recorded() -> None:
    dense = fit_results()["dense"]
    report = validate_suite(load_validation_file(DENSE))
    assert len(report.cases) == dense["runs"]
    assert report.mape == pytest.approx(dense["mape_with_host_time"], abs=ROUNDING)


def test_the_fit_file_is_what_the_fit_writes_today(published: dict[str, Any]) -> None:
    # The script's check mode exits 1 when the file differs from a fit run now (inputs, code or grid changed).
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "fit_framework_overheads.py"), "--moe", str(SHARED_VALIDATION)],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_the_model_uses_the_fitted_figures() -> None:
    fit = fit_results()
    assert MEGATRON_CORE_EAGER.sustained_compute_fraction == fit["sustained_compute_fraction"]
    assert MEGATRON_CORE_EAGER.kernel_host_us == fit["kernel_host_us"]
    assert f"{fit['moe']['mape_leave_one_group_out']:.1%} leave-one-group-out" in MEGATRON_CORE_EAGER.source


@pytest.mark.parametrize("doc", ["README.md", "planner/costmodel/README.md"])
def test_the_readmes_quote_the_fit_file(doc: str) -> None:
    text = (REPO / doc).read_text(encoding="utf-8")
    block = text[text.index(DOCS_BEGIN) : text.index(DOCS_END) + len(DOCS_END)]
    assert block == summary_markdown()


def test_validate_scores_memory(published: dict[str, Any]) -> None:
    # A measured peak is scored against the predicted one, and an out-of-memory outcome the model
    # predicts to fit is a missed OOM: both from the file's own fields, on two cases of the real file.
    suite = load_validation_file(SHARED_VALIDATION)
    first = validate_suite(suite)
    fitting = [c for c in first.cases if c.fits and c.measured is not None]
    peaked, crashed = fitting[0], fitting[1]
    measured_gib = peaked.predicted_allocated_gib * 1.25
    cases = []
    for case in suite.cases:
        if case.id == peaked.id:
            case = case.model_copy(
                update={"measured": case.measured.model_copy(update={"peak_memory_gib": measured_gib})}
            )
        elif case.id == crashed.id:
            case = case.model_copy(
                update={"measured": case.measured.model_copy(update={"value": None, "outcome": "oom"})}
            )
        cases.append(case)
    report = validate_suite(suite.model_copy(update={"cases": tuple(cases)}))
    assert report.missed_oom == (crashed.id,)
    assert report.false_oom == first.false_oom
    assert report.memory_mape == pytest.approx(0.2)  # predicted = measured / 1.25, 20% under
    scored = next(c for c in report.cases if c.id == peaked.id)
    assert scored.memory_error == pytest.approx(-0.2)


def test_validate_says_when_a_file_was_fitted_and_gives_the_held_out_error(published: dict[str, Any]) -> None:
    """Issue 17 item 1: the figure told to users is the held-out one. The fit records the SHA-256 of the
    files it read; validate of such a file names the fitted figure and its held-out error."""
    from planner.workflows.validate import validate_file

    moe, dense = fit_results()["moe"], fit_results()["dense"]
    fitted = validate_file(SHARED_VALIDATION, with_solve=False).to_json()["fitted_here"]
    assert fitted == {"figure": "kernel_host_us", "held_out_mape": moe["mape_leave_one_group_out"],
                         "method": f"leave one of {moe['groups']} groups out"}  # fmt: skip
    assert (
        validate_file(DENSE, with_solve=False).to_json()["fitted_here"]["held_out_mape"]
        == dense["mape_leave_one_out"]
    )
    held_out = REPO / "benchmarks" / "data" / "korthikanti-table5.yaml"
    assert validate_file(held_out, with_solve=False).to_json()["fitted_here"] is None
