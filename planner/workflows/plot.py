"""``moeplan plot`` as a workflow: the estimates to draw, of a plan file (priced on the profile it
records, unless it carries its estimate) or of the top plans of a solve."""

from __future__ import annotations

from pathlib import Path

from planner.costmodel import estimate
from planner.present.labels import layout_label
from planner.schema import Estimate, TrainingSpec
from planner.workflows.plans import read_plan

__all__ = ["Entries", "plan_entries", "solved_entries"]

Entries = list[tuple[str, Estimate]]
"""(label, estimate) of each plan to draw, the best first."""


def plan_entries(plan_path: Path) -> tuple[Entries, str]:
    """The plan file's estimate (its own, else priced on the profile it records) and a title."""
    found = read_plan(plan_path)
    plan = found.plan
    priced = plan.estimate or estimate(found.model(), plan.training, plan.parallel, found.cluster())
    title = f"{plan.model.name} on {plan.cluster.name} ({plan.num_gpus} GPUs)"
    return [(layout_label(plan.parallel), priced)], title


def solved_entries(
    model: str, cluster: str | None, nodes: int | None, training: TrainingSpec, top: int
) -> tuple[Entries, str]:
    """The best plan and the best of up to ``top - 1`` other structures, and a title."""
    from planner.catalog import resolve_cluster, resolve_model
    from planner.search import SearchOptions, solve

    spec, model_ref = resolve_model(model)
    resolved = resolve_cluster(cluster, nodes)
    result = solve(
        spec, training, resolved.profile, SearchOptions(), top_k=max(top - 1, 1), model_ref=model_ref,
        cluster_ref=resolved.ref,
    )  # fmt: skip
    assert result.plan.estimate is not None
    plans = [(result.plan.parallel, result.plan.estimate)]
    plans += [(a.parallel, a.estimate) for a in result.alternatives[: top - 1]]
    entries = [(f"{layout_label(p)} {p.dispatcher.kind}", found) for p, found in plans]
    title = f"{spec.name} on {resolved.profile.name} ({resolved.profile.world_size} GPUs), sequence {training.seq_len}"
    return entries, title
