"""``moeplan validate`` as a workflow: score the cost model on a validation file, and (``--solve``)
compare each group's solved plan with its best measured configuration."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.accuracy.validate import GroupSolution, ValidationReport, solve_groups, validate_suite
from planner.accuracy.validation_file import load_validation_file
from planner.costmodel.framework_fit import FitUse, fitted_to, locked_score

__all__ = ["Validation", "validate_file"]


@dataclass(frozen=True)
class Validation:
    """The report and, per group, the solved plan when asked for."""

    report: ValidationReport
    solutions: dict[str, GroupSolution]
    fit: FitUse | None = None
    """The framework figure fitted to this very file (its error here is in-sample), or None."""
    locked: bool = False
    """A locked file: scored by the fit script after it has fitted, never fitted to (its error is held out)."""

    def to_json(self) -> dict[str, Any]:
        report, solutions = self.report, self.solutions
        groups = [
            _group_json(g.group, list(g.case_ids), g.kendall_tau, g.top1_match, solutions)
            | {"pairs": g.pairs, "pairs_right": g.pairs_right}
            for g in report.groups
        ]
        named = {g.group for g in report.groups}
        groups += [_group_json(name, [], None, None, solutions) for name in solutions if name not in named]
        cases = [
            {"id": c.id, "group": c.group, "metric": c.metric, "predicted": c.predicted, "measured": c.measured,
             "error": c.error, "fits": c.fits, "ran": c.ran, "predicted_peak_gib": c.predicted_peak_gib,
             "predicted_allocated_gib": c.predicted_allocated_gib, "measured_peak_gib": c.measured_peak_gib,
             "memory_error": c.memory_error, "fits_if_unstated": c.fits_if_unstated}
            for c in report.cases
        ]  # fmt: skip
        memory = {
            "false_oom": list(report.false_oom),
            "oom_unless_unstated": list(report.oom_unless_unstated),
            "missed_oom": list(report.missed_oom),
            "peak_mape": report.memory_mape,
        }
        first, ranked = report.top1_groups
        ranking = {
            "top1_groups": first,
            "groups": ranked,
            "pairs": report.pairs,
            "pairwise_accuracy": report.pairwise_accuracy,
        }
        fit = None if self.fit is None else {
            "figure": self.fit.figure, "held_out_mape": self.fit.held_out, "method": self.fit.method,
        }  # fmt: skip
        return {"cases": cases, "groups": groups, "mape": report.mape, "fitted_here": fit, "locked": self.locked,
                "ranking": ranking, "memory": memory}  # fmt: skip


def _group_json(
    group: str, cases: list[str], tau: float | None, top1: bool | None, solutions: dict[str, GroupSolution]
) -> dict[str, Any]:
    entry: dict[str, Any] = {"group": group, "cases": cases, "kendall_tau": tau, "top1_match": top1}
    if group in solutions:
        solution = solutions[group]
        entry |= {
            "solver_plan": solution.solver_plan,
            "solver_predicted": solution.solver_predicted,
            "best_measured_predicted": solution.best_measured_predicted,
            "best_measured_fits": solution.best_measured_fits,
        }
    return entry


def validate_file(
    path: Path, with_solve: bool, progress: Callable[[int, int, str], None] | None = None
) -> Validation:
    """Score the cost model on the file; solve each group too when ``with_solve`` (reporting each group to
    ``progress``, as ``solve_groups`` does)."""
    suite = load_validation_file(path)
    report = validate_suite(suite)
    solutions = {s.group: s for s in solve_groups(suite, report, progress)} if with_solve else {}
    # The file's bytes as read: a fit records the SHA-256 of the files it read and of the locked files it
    # scored afterwards (framework_fit.json).
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return Validation(report, solutions, fitted_to(sha256), locked_score(sha256) is not None)
