"""The launcher reports the stages the parent sees: ranks starting, started, rank 0's own reports, exited."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from planner.execution.launcher import local_placement, run_ranks

ROOT = Path(__file__).resolve().parents[2]


def test_run_ranks_reports_its_stages_in_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(ROOT)  # the ranks run `python -m tests.unit.rank_reports` from here
    events: list[tuple[int, int, str]] = []
    run_ranks("tests.unit.rank_reports", "{}", local_placement(2), tmp_path, "test", timeout_s=60,
              deadline=time.time() + 60, progress=lambda done, total, what: events.append((done, total, what)))  # fmt: skip
    assert events[:2] == [
        (0, 0, "starting 2 ranks"), (0, 0, "2 ranks started: importing torch, joining the process group")
    ]  # fmt: skip
    assert (0, 1, "step 1 of 1") in events  # rank 0's report, passed on
    assert events[-1] == (2, 2, "all 2 ranks exited")
    exits = [done for done, total, what in events if what.endswith("ranks exited")]
    assert exits == sorted(exits)
