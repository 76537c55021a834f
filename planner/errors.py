"""The exception hierarchy: every error a user can cause is a MoeplanError with a one-paragraph message."""

from __future__ import annotations

__all__ = ["ExecutionError", "InfeasiblePlanError", "MoeplanError", "SolverError", "SpecError"]


class MoeplanError(Exception):
    """Base class for errors moeplan reports to the user without a traceback."""

    exit_code = 1


class SpecError(MoeplanError, ValueError):
    """Bad input: a file, a name or an option that breaks a rule. The message names field, value and rule."""

    exit_code = 2


class InfeasiblePlanError(MoeplanError):
    """No plan satisfies the constraints (for example the model does not fit in memory)."""

    exit_code = 3


class SolverError(MoeplanError):
    """The solver is missing, timed out without a solution, or returned an unexpected status."""

    exit_code = 4


class ExecutionError(MoeplanError):
    """A distributed job moeplan started (a probe, a run) failed: a rank died, timed out or exceeded its budget."""

    exit_code = 5
