"""Run a moeplan command in-process as a user would, returning exit code, stdout and stderr."""

from __future__ import annotations

from typer.testing import CliRunner

from planner.cli import app

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    """The command's exit code, stdout and stderr; an unexpected exception (a bug) is re-raised."""
    result = runner.invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr
