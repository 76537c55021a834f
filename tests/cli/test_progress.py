"""Progress of long work: on stderr only, a live line on a terminal, plain lines otherwise."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from planner.cli import app
from planner.cli import progress as cli_progress
from planner.cli import solve as cli_solve
from tests.cli.test_cli import SMALL_VALIDATION

SOLVE = ["solve", "--model", "tiny-moe", "--cluster", "a800-2x8", "--nodes", "1", "--gbs", "32", "--json"]
ESCAPE = re.compile(r"\x1b\[")


def _invoke(monkeypatch: pytest.MonkeyPatch, args: list[str], terminal: bool) -> tuple[str, str]:
    # As if stderr were a terminal, or not (CliRunner's streams are not; the console decides at import).
    monkeypatch.setattr(cli_progress.err, "is_interactive", terminal)
    result = CliRunner().invoke(app, args, env={"TTY_COMPATIBLE": "1" if terminal else "0"})
    assert result.exit_code == 0, result.output
    return result.stdout, result.stderr


def test_solve_on_a_terminal_shows_a_live_line_on_stderr_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_solve, "PROGRESS_AFTER_S", 0.0)
    stdout, stderr = _invoke(monkeypatch, SOLVE, terminal=True)
    assert json.loads(stdout)["solver"]["optimal"] is True
    assert ESCAPE.search(stderr) and "solve" in stderr and "layouts" in stderr


def test_solve_without_a_terminal_prints_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_solve, "PROGRESS_AFTER_S", 0.0)
    stdout, stderr = _invoke(monkeypatch, SOLVE, terminal=False)
    assert json.loads(stdout)["solver"]["optimal"] is True
    lines = stderr.splitlines()
    assert not ESCAPE.search(stderr) and lines
    assert all(re.fullmatch(r"moeplan solve: .+ \(\d+ s\)", line) for line in lines), lines
    assert lines[0].startswith("moeplan solve: sizing and pricing") and "done, " in lines[-1]


def test_a_solve_quicker_than_the_delay_shows_no_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_solve, "PROGRESS_AFTER_S", 1e9)
    for terminal in (True, False):
        _, stderr = _invoke(monkeypatch, SOLVE, terminal)
        assert "layouts" not in stderr


def test_plain_lines_come_at_milestones_and_at_most_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    printed: list[str] = []
    monkeypatch.setattr(cli_progress.err, "print", lambda text, **_: printed.append(text))
    monkeypatch.setattr(cli_progress.err, "is_interactive", False)
    with cli_progress.progress_bar("run") as progress:
        progress(0, 0, "starting 2 ranks")  # milestone: a stage starts
        progress(0, 20, "step 1 of 20")  # milestone
        for step in range(1, 20):
            progress(step, 20, f"step {step + 1} of 20")  # within PLAIN_EVERY_S: left out
        progress(20, 20, "done")  # milestone: the end
    assert [line.split(": ", 1)[1].rsplit(" (", 1)[0] for line in printed] == [
        "starting 2 ranks", "step 1 of 20", "done"
    ]  # fmt: skip


@pytest.mark.parametrize("terminal", [True, False])
def test_validate_solve_reports_each_group(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, terminal: bool
) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(SMALL_VALIDATION)
    stdout, stderr = _invoke(monkeypatch, ["validate", str(path), "--solve", "--json"], terminal)
    assert json.loads(stdout)["groups"][0]["group"] == "G"
    assert "group 1 of 1: solving 'G'" in stderr
    if not terminal:
        assert stderr.splitlines() == [
            line for line in stderr.splitlines() if re.fullmatch(r"moeplan validate: .+ \(\d+ s\)", line)
        ]
        assert "done: 1 of 1 groups solved" in stderr.splitlines()[-1]


def test_validate_without_solve_shows_no_progress(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(SMALL_VALIDATION)
    _, stderr = _invoke(monkeypatch, ["validate", str(path), "--json"], terminal=False)
    assert stderr == ""


def test_milestones_within_the_delay_are_shown_once_the_work_outlasts_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``run`` waits a second before its first line; its start-up milestones (often quicker than that)
    are not lost, and a run that ends within the delay still shows nothing."""
    clock = [100.0]
    monkeypatch.setattr(cli_progress.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(cli_progress.err, "is_interactive", False)
    for outlasts, expected in ((True, ["starting 2 ranks (0 s)", "2 ranks started (0 s)", "step 1 of 2 (3 s)"]),
                               (False, [])):  # fmt: skip
        printed: list[str] = []
        monkeypatch.setattr(cli_progress.err, "print", lambda text, **_: printed.append(text))  # noqa: B023
        clock[0] = 100.0
        with cli_progress.progress_bar("run", delay_s=1.0) as progress:
            progress(0, 0, "starting 2 ranks")
            clock[0] += 0.2
            progress(0, 0, "2 ranks started")
            clock[0] += 2.8 if outlasts else 0.5
            progress(0, 2, "step 1 of 2")
        assert [line.split(": ", 1)[1] for line in printed] == expected
