"""What ``solve`` reports while it works: counts and the best step time so far (``solve(progress=...)``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["PROGRESS_EVERY_S", "ProgressReporter", "SolveProgress"]

PROGRESS_EVERY_S = 0.25
"""Seconds between two reports while layouts are solved (the first and the last are always made)."""


@dataclass(frozen=True, slots=True)
class SolveProgress:
    """Where a solve stands. From one report to the next no count decreases; the last has ``done``."""

    layouts: int
    """Candidate layouts in the search space."""
    priced: int
    """Layouts that fit in memory (the search orders them by bound and prices those it reaches); 0 while
    memory is sized."""
    solved: int
    """Layouts given a stage assignment so far (even-split seeds, then branch and bound)."""
    best_step_time_s: float | None
    """Predicted step time of the best plan found so far; None before one is found."""
    elapsed_s: float
    done: bool = False
    """The search is over: the plan (or the error saying why there is none) follows."""


class ProgressReporter:
    """Turns the search's state into ``SolveProgress`` reports, at most one every ``PROGRESS_EVERY_S``
    (no-op without a callback)."""

    def __init__(self, progress: Callable[[SolveProgress], None] | None, start: float, layouts: int) -> None:
        self._progress, self._start, self._layouts = progress, start, layouts
        self._last: float | None = None

    def __call__(
        self, priced: int, solved: int, best: tuple[float, object, object] | None, done: bool = False
    ) -> None:
        if self._progress is None:
            return
        now = time.perf_counter()
        if not done and self._last is not None and now - self._last < PROGRESS_EVERY_S:
            return
        self._last = now
        best_s = None if best is None else best[0]
        self._progress(SolveProgress(self._layouts, priced, solved, best_s, now - self._start, done))
