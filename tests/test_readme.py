"""The README's example outputs are what moeplan prints today (docs that cannot drift).

For each command below, every output line the README shows under it must appear in the command's real
output, whitespace aside (the README trims tables to a few rows). Wall-clock times are not compared.
"""

from __future__ import annotations

import re
import shlex

import pytest
from typer.testing import CliRunner

from planner.cli import app
from tests.conftest import REPO

SHOWN = [
    "moeplan models",
    "moeplan estimate --model mixtral-8x7b --cluster dgx-h100 --tp 2 --pp 2 --ep 8 --gbs 256 --dispatcher deepep",
    "moeplan solve --model mixtral-8x7b --cluster dgx-h100 --gbs 256",
]
"""The README commands whose output it shows."""
_SECONDS = re.compile(r", [0-9.]+ s$")


def _normal(line: str) -> str:
    return " ".join(_SECONDS.sub("", line.strip()).split())


def _shown_output(command: str) -> list[str]:
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index(f"$ {command}")
    shown = []
    for line in lines[start + 1 :]:
        if line.startswith(("$ ", "```")):
            break
        if "..." not in line and not line.startswith(("┏", "┡", "└", "┌", "╭", "╰")):
            shown.append(_normal(line))
    return shown


@pytest.mark.parametrize("command", SHOWN)
def test_the_readme_shows_what_the_command_prints(command: str) -> None:
    shown = _shown_output(command)
    assert shown, f"the README shows no output under '$ {command}'"
    result = CliRunner().invoke(app, shlex.split(command)[1:], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    printed = {_normal(line) for line in result.stdout.splitlines()}
    assert [line for line in shown if line not in printed] == []
