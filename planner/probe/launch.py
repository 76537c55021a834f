"""Start the probe's ranks as local processes (``--nproc``) or inside the testbed's namespaces (``--testbed``)
through ``planner/execution/launcher.py``, and read back rank 0's record. Torch-free."""

from __future__ import annotations

import tempfile
from pathlib import Path

from planner.errors import ExecutionError
from planner.execution.launcher import ProgressFn, RankPlacement, run_ranks, tail
from planner.probe.probe_options import ProbeOptions
from planner.probe.results import ProbeResults

__all__ = ["GRACE_S", "launch"]

GRACE_S = 60.0
"""Seconds a probe may run past its budget (process start-up on a loaded host) before it is stopped."""


def launch(
    options: ProbeOptions, placement: RankPlacement, progress: ProgressFn | None = None
) -> ProbeResults:
    """Run every rank to completion and return rank 0's record; ExecutionError if any rank fails."""
    with tempfile.TemporaryDirectory(prefix="moeplan-probe-") as tmp:
        results_path = Path(tmp) / "results.json"
        options = options.model_copy(update={"results_path": str(results_path)})
        deadline = options.started + options.budget_s + GRACE_S
        run_ranks(
            "planner.probe.worker",
            options.model_dump_json(),
            placement,
            Path(tmp),
            deadline,
            "probe",
            progress,
        )
        if not results_path.is_file():
            raise ExecutionError(
                f"the probe's rank 0 ended without writing its results.\n{tail(Path(tmp) / 'rank0.log')}"
            )
        return ProbeResults.model_validate_json(results_path.read_text(encoding="utf-8"))
