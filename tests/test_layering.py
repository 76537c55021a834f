"""Architecture checks that a linter cannot make: planning stays torch-free and imports stay light."""

from __future__ import annotations

import subprocess
import sys

PLANNING_MODULES = ["planner", "planner.cli", "planner.catalog", "planner.catalog", "planner.topology",
                    "planner.costmodel", "planner.feasibility", "planner.present.report"]  # fmt: skip


def _modules_after_import(modules: list[str]) -> set[str]:
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint(' '.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_planning_never_imports_torch() -> None:
    loaded = _modules_after_import(PLANNING_MODULES)
    assert "torch" not in loaded


def test_import_planner_is_light() -> None:
    loaded = _modules_after_import(["planner"])
    assert not loaded & {"torch", "pulp", "rich", "networkx", "pydantic", "yaml"}


def test_moeplan_models_runs_without_torch_on_the_path() -> None:
    # Block torch outright: the planning commands must not even try to import it.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from typer.testing import CliRunner\nfrom planner.cli import app\n"
        "r = CliRunner().invoke(app, ['models', '--json'])\nassert r.exit_code == 0, r.output\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_probe_parent_process_does_not_import_torch() -> None:
    # The parent of `moeplan probe --nproc/--testbed` only starts ranks and fits figures.
    loaded = _modules_after_import(
        [
            "planner.workflows.probe",
            "planner.probe.build",
            "planner.execution.testbed",
        ]
    )
    assert "torch" not in loaded
