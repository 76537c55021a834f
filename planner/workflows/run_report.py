"""``moeplan run``'s record: start the ranks (or be one), then put the cost model's prediction of what
ran beside what was measured, with the plan settings that did not run."""

from __future__ import annotations

from typing import Any

from planner.accuracy.calibrate import RUN_RECORD_FORMAT
from planner.costmodel.runs import estimate_run
from planner.errors import MoeplanError
from planner.execution.launcher import ProgressFn
from planner.runtime.run_options import RunResults
from planner.workflows.run import RunOutcome, launch_run
from planner.workflows.run_request import RunRequest, cluster_for_run

__all__ = ["predict_run", "run_and_report"]


def predict_run(request: RunRequest, cluster: str | None) -> tuple[dict[str, Any] | None, str]:
    """The cost model's estimate of what the run ran, or why there is none (one rule:
    ``costmodel.runs.run_profile``)."""
    options = request.options
    world = options.parallel.dp * options.parallel.tp * options.parallel.cp * options.parallel.pp
    try:
        profile = cluster_for_run(cluster, request.plan)
        result = estimate_run(
            options.model, request.training, options.parallel, profile, world, options.ranks_per_node
        )
    except MoeplanError as exc:
        return None, f"no prediction: {exc}"
    return result.model_dump(mode="json"), f"predicted on profile '{profile.name}'"


def _as_rank(request: RunRequest) -> RunOutcome | None:
    """This process as one rank of a torchrun job: rank 0's outcome, None on the other ranks."""
    from planner.runtime.train import run_rank  # torch: only the ranks themselves import it

    results: RunResults | None = run_rank(request.options)
    return None if results is None else RunOutcome(results, None)


def run_and_report(
    request: RunRequest, cluster: str | None, progress: ProgressFn | None = None
) -> dict[str, Any] | None:
    """Run every rank and return rank 0's record with the prediction (None on the other torchrun ranks)."""
    if request.placement is None:
        outcome = _as_rank(request)
        if outcome is None:  # not rank 0: rank 0 reports for the job
            return None
    else:
        outcome = launch_run(request.options, request.placement, progress)
    predicted, note = predict_run(request, cluster)
    plan = request.plan
    report: dict[str, Any] = outcome.results.model_dump(mode="json")
    report.update(
        format=RUN_RECORD_FORMAT,
        model=request.options.model_name,
        training=request.training.model_dump(mode="json"),
        ranks_per_node=request.options.ranks_per_node,
        cluster=cluster,
        plan=str(plan.path) if plan is not None else None,
        ignored_plan_fields=[field.to_json() for field in request.ignored],
        notes=list(request.notes),
        predicted=predicted,
        prediction_note=note,
        interface_tx_bytes=outcome.interface_tx_bytes,
    )
    return report
