"""One ``moeplan run``: where the ranks run and how the record comes back (torch-free).

As for the probe, ``--nproc N`` starts N local ranks over loopback and ``--testbed`` runs them inside the
emulated cluster's namespaces, so the bytes that cross "nodes" also show in the kernel's interface
counters (read before and after, an independent check of the runtime's own count). Under torchrun the
process is itself a rank (``workflows/run_report.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.errors import SpecError
from planner.execution.launcher import ProgressFn, RankPlacement, local_placement, run_job, testbed_placement
from planner.runtime.run_options import RunOptions, RunResults, unsupported

__all__ = ["RunOutcome", "launch_run", "placement_for"]


@dataclass(frozen=True)
class RunOutcome:
    """Rank 0's record, and the testbed's interface counters (bytes each node sent) when on the testbed."""

    results: RunResults
    interface_tx_bytes: dict[int, int] | None


def placement_for(nproc: int | None, testbed: bool, ranks_per_node: int | None) -> RankPlacement:
    """Local ranks (optionally grouped into pretend nodes of ``ranks_per_node``) or the testbed's."""
    if testbed:
        return testbed_placement(nproc)
    if nproc is None:
        raise SpecError("moeplan run needs --nproc N (local ranks) or --testbed (the emulated cluster)")
    placement = local_placement(nproc)
    if ranks_per_node is not None:
        if ranks_per_node < 1 or nproc % ranks_per_node:
            raise SpecError(f"--ranks-per-node ({ranks_per_node}) must divide --nproc ({nproc})")
        placement = RankPlacement(
            placement.prefixes, placement.master_addr, placement.interface, ranks_per_node
        )
    return placement


def _tx_bytes(nodes: int) -> dict[int, int]:
    from planner.execution.testbed import interface_counters, status

    bed = status()
    assert bed is not None
    return {node: interface_counters(bed, node)[1] for node in range(nodes)}


def launch_run(
    options: RunOptions, placement: RankPlacement, progress: ProgressFn | None = None
) -> RunOutcome:
    """Run every rank and return rank 0's record; ExecutionError if a rank fails or stops responding."""
    from planner.runtime.dispatchers import refusal  # imports the kind's module, and torch, when called

    reason = unsupported(options) or refusal(options.parallel)
    if reason:
        raise SpecError(reason)
    on_testbed = placement.master_addr.startswith("198.18.")
    nodes = len(placement.prefixes) // placement.ranks_per_node
    before = _tx_bytes(nodes) if on_testbed else None
    # No deadline: a healthy run goes on as long as its steps take; a stopped rank ends it (heartbeats).
    record = run_job(
        "planner.runtime.train", options.model_dump_json(), placement, "run",
        timeout_s=options.timeout_s, progress=progress,
    )  # fmt: skip
    results = RunResults.model_validate_json(record)
    counters = None
    if before is not None:
        after = _tx_bytes(nodes)
        counters = {node: after[node] - before[node] for node in before}
    return RunOutcome(results, counters)
