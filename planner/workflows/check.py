"""``moeplan check`` as a workflow: read every case first (a bad file fails before any solve), solve
each, and count the outcomes."""

from __future__ import annotations

import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from planner.accuracy.golden import CaseOutcome, check_case, find_cases, load_case, write_junit
from planner.errors import SpecError
from planner.specfiles import check_writable

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
    for path in paths:
        _refuse_unreadable(path)
    cases = [(path, load_case(path)) for path in find_cases(paths)]  # every file is read before any solve
    if junit_xml is not None:
        check_writable(junit_xml)  # before the solves, not after them
    outcomes = []
    for path, case in cases:
        outcome = check_case(path, case, update=update)
        outcomes.append(outcome)
        if each is not None:
            each(outcome)
    if junit_xml is not None:
        write_junit(junit_xml, outcomes)
    return CheckRun(tuple(outcomes))


def _refuse_unreadable(path: Path) -> None:
    """SpecError for a path given to ``check`` that names no file or folder it can read: a FIFO, socket or
    device (which the search for case files would pass over as missing), or a path the system refuses
    (through a regular file, a name too long). A path that does not exist is ``find_cases``'s to name."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SpecError(f"check path '{path}' cannot be read: {exc.strerror or exc}.") from None
    if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
        raise SpecError(
            f"check path '{path}' is not a regular file (a FIFO, socket or device) nor a folder: give case "
            "files (*.check.yaml) or folders holding them."
        )
