"""solve(progress=...): what the search reports while it works."""

from __future__ import annotations

import pytest

from planner.catalog import load_cluster, load_model
from planner.errors import InfeasiblePlanError
from planner.schema import TrainingSpec
from planner.search import SolveProgress, solve
from planner.search import progress as search_progress


def test_reports_grow_and_end_with_one_final_report(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search_progress, "PROGRESS_EVERY_S", 0.0)  # every report, not one per 0.25 s
    reports: list[SolveProgress] = []
    result = solve(
        load_model("tiny-moe"),
        TrainingSpec(global_batch=64),
        load_cluster("dgx-h100", 2),
        progress=reports.append,
    )
    assert len(reports) >= 3  # before pricing, after pricing, the end
    first, last = reports[0], reports[-1]
    assert (first.priced, first.solved, first.best_step_time_s, first.done) == (0, 0, None, False)
    assert [r.done for r in reports] == [False] * (len(reports) - 1) + [True]
    for before, after in zip(reports, reports[1:], strict=False):
        assert after.priced >= before.priced and after.solved >= before.solved
        assert after.elapsed_s >= before.elapsed_s
        assert after.layouts == before.layouts == result.layouts
        if before.best_step_time_s is not None:  # the best plan so far only gets better
            assert after.best_step_time_s is not None and after.best_step_time_s <= before.best_step_time_s
    assert last.solved == result.solved and 0 < last.priced <= last.layouts
    assert result.plan.estimate is not None and last.best_step_time_s == pytest.approx(
        result.plan.estimate.step_time_s
    )


def test_reports_are_throttled_but_keep_the_first_and_the_last(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search_progress, "PROGRESS_EVERY_S", 1e9)
    reports: list[SolveProgress] = []
    solve(
        load_model("tiny-moe"),
        TrainingSpec(global_batch=64),
        load_cluster("dgx-h100", 2),
        progress=reports.append,
    )
    assert [(r.priced, r.done) for r in reports][0] == (0, False) and reports[-1].done
    assert len(reports) == 2


def test_no_plan_reports_nothing_past_memory_sizing() -> None:
    # A model that fits nowhere fails before any layout is priced: the first report is the only one.
    reports: list[SolveProgress] = []
    with pytest.raises(InfeasiblePlanError):
        solve(load_model("deepseek-v3"), TrainingSpec(global_batch=64), load_cluster("a800-2x8", 1),
              progress=reports.append)  # fmt: skip
    assert [(r.priced, r.solved, r.done) for r in reports] == [(0, 0, False)]
