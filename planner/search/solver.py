"""The one place a PuLP solver is chosen and configured, and its status read.

HiGHS through PuLP (in-process, maintained; PuLP 4 drops the bundled CBC), CBC as fallback. Settings
for reproducible plans (ecosystem.md §8): one thread, fixed seed, explicit relative gap. A plan is
proven optimal only when ``status == 1 and sol_status == 1``; ``sol_status == 2`` means a solution
at the time limit whose gap did not close.

The solver runs with file descriptor 1 pointed at the null device: highspy 1.16 prints its banner from
C to standard output when a ``Highs`` object is created, whatever ``output_flag`` says, and that would
corrupt ``moeplan solve --json``.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pulp

from planner.errors import SolverError

__all__ = ["SolveResult", "solve_problem"]

OPTIMAL, FEASIBLE = 1, 2
"""pulp.LpSolution codes: an optimal solution, a solution without proven optimality."""


@dataclass(frozen=True, slots=True)
class SolveResult:
    status: str
    optimal: bool
    objective: float | None


@functools.cache
def _available() -> frozenset[str]:
    """The solvers PuLP can run here (probing them all takes milliseconds; a search runs hundreds of ILPs)."""
    return frozenset(pulp.listSolvers(onlyAvailable=True))


def _solver(time_limit_s: float, gap: float, presolve: bool) -> pulp.LpSolver:
    if "HiGHS" in _available():
        options = {} if presolve else {"presolve": "off"}
        return pulp.HiGHS(msg=False, timeLimit=time_limit_s, gapRel=gap, threads=1, random_seed=0, **options)
    if "PULP_CBC_CMD" in _available():
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=gap, threads=1, presolve=presolve)
    raise SolverError("no MILP solver is available to PuLP: install highspy (pip install highspy).")


@contextmanager
def _native_stdout_silenced() -> Iterator[None]:
    """File descriptor 1 on the null device for the duration (Python's own stdout flushed first)."""
    sys.stdout.flush()
    saved = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(null)
        os.close(saved)


def solve_problem(
    problem: pulp.LpProblem, time_limit_s: float, gap: float, presolve: bool = True
) -> SolveResult:
    """Solve ``problem`` in place and report what the solver proved (``presolve=False`` for a problem
    known to be feasible: HiGHS 1.15.1's presolve has declared such a one infeasible)."""
    with _native_stdout_silenced():
        problem.solve(_solver(time_limit_s, gap, presolve))
    solution = problem.sol_status
    if solution == OPTIMAL and problem.status == 1:
        return SolveResult("optimal", True, pulp.value(problem.objective))
    if solution == FEASIBLE:
        return SolveResult("time limit", False, pulp.value(problem.objective))
    if problem.status == -1:
        return SolveResult("infeasible", False, None)
    return SolveResult(pulp.LpStatus.get(problem.status, "unknown").lower(), False, None)
