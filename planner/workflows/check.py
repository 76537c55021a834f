"""``moeplan check`` as a workflow: read every case first (a bad file fails before any solve), solve
each, and count the outcomes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from planner.accuracy.golden import CaseOutcome, check_case, find_cases, load_case, write_junit

__all__ = ["CheckRun", "check_cases"]


@dataclass(frozen=True)
class CheckRun:
    """Every case's outcome and the counts by status."""

    outcomes: tuple[CaseOutcome, ...]

    @property
    def counts(self) -> dict[str, int]:
        return {
            status: sum(o.status == status for o in self.outcomes)
            for status in ("pass", "regression", "updated")
        }

    @property
    def ok(self) -> bool:
        return self.counts["regression"] == 0


def check_cases(
    paths: Sequence[Path],
    update: bool,
    junit_xml: Path | None = None,
    each: Callable[[CaseOutcome], None] | None = None,
) -> CheckRun:
    """Solve every case under ``paths`` (``each`` sees each outcome as it comes); write JUnit XML if asked."""
    cases = [(path, load_case(path)) for path in find_cases(paths)]  # every file is read before any solve
    outcomes = []
    for path, case in cases:
        outcome = check_case(path, case, update=update)
        outcomes.append(outcome)
        if each is not None:
            each(outcome)
    if junit_xml is not None:
        write_junit(junit_xml, outcomes)
    return CheckRun(tuple(outcomes))
