"""``solve --emit`` prints what ``emit`` prints, unwrapped at any terminal width (issue 18 item 5)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MOEPLAN = [sys.executable, "-m", "planner"]


def _run(*args: str, columns: int = 40) -> str:
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "xterm"}
    done = subprocess.run([*MOEPLAN, *args], capture_output=True, text=True, env=env, check=True, timeout=300)
    return done.stdout


def test_solve_emit_is_emit_and_bash_reads_it(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    printed = _run("solve", "--model", "2x70B", "--emit", "megatron", "-o", str(plan))
    snippet = printed[printed.index("# Megatron-LM arguments") :]
    assert snippet == _run("emit", "--plan", str(plan), "--format", "megatron")
    # Nothing wrapped at the 40 columns: every comment line is one line, the arguments one per line.
    assert all(
        line.startswith(("#", "export ", "MEGATRON_ARGS=(", "    --", ")")) for line in snippet.splitlines()
    )
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    subprocess.run(["bash", "-n"], input=snippet, text=True, check=True)
