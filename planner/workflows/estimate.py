"""``moeplan estimate`` as a workflow: one layout priced, given by flags on the schema's defaults or by a
plan file (re-priced on the profile it records, with ``--set`` changes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.catalog import load_cluster, load_model
from planner.costmodel import estimate
from planner.errors import SpecError
from planner.feasibility import require_feasible, with_gpu_precision
from planner.overrides import override_plan
from planner.schema import ClusterProfile, Estimate, ModelSpec, ParallelConfig, TrainingSpec
from planner.workflows.layouts import layout_from
from planner.workflows.plans import read_plan

__all__ = ["EstimateOutcome", "estimate_layout", "estimate_plan"]


@dataclass(frozen=True)
class EstimateOutcome:
    """A priced layout, what it was priced on, and what the user should know about it."""

    model_name: str
    profile: ClusterProfile
    training: TrainingSpec
    parallel: ParallelConfig
    estimate: Estimate
    warnings: tuple[str, ...] = ()
    """Rules Megatron-LM would break that other frameworks run (DeepSpeed-MoE's TP without SP)."""
    notes: tuple[str, ...] = ()
    """What followed from the changes (``--set``) to a plan."""


def _priced(
    model: ModelSpec,
    profile: ClusterProfile,
    training: TrainingSpec,
    parallel: ParallelConfig,
    notes: list[str],
) -> EstimateOutcome:
    # A configuration Megatron-LM rejects is an error; a Megatron-only rule that DeepSpeed-MoE runs warns.
    warnings = require_feasible(
        model, training, parallel, profile.world_size, megatron=False, gpu=profile.gpu
    )
    result = estimate(model, training, parallel, profile)
    said = tuple(f"{w} (priced as DeepSpeed-MoE runs it)" for w in warnings)
    return EstimateOutcome(model.name or "model", profile, training, parallel, result, said, tuple(notes))


def estimate_layout(
    model: str, cluster: str, nodes: int | None, assignments: Sequence[tuple[str, Any]]
) -> EstimateOutcome:
    """The layout the flags give (dotted assignments on the schema's defaults), priced on ``cluster``."""
    profile = load_cluster(cluster, nodes)
    training, parallel = layout_from(assignments, profile.world_size)
    training = with_gpu_precision(training, profile.gpu)
    return _priced(load_model(model), profile, training, parallel, [])


def estimate_plan(
    plan_path: Path,
    assignments: Sequence[tuple[str, Any]],
    model: str | None = None,
    cluster: str | None = None,
) -> EstimateOutcome:
    """A plan re-priced exactly (its uneven stages included) on the profile it records, or on ``cluster``
    (resized to the plan's node count), after ``assignments`` changed its settings."""
    found = read_plan(plan_path)
    plan, notes = override_plan(found.plan, assignments)
    profile = found.cluster(cluster, plan.num_nodes if cluster else None)
    if profile.world_size != plan.num_gpus:
        raise SpecError(
            f"cluster '{profile.name}' has {profile.world_size} GPUs and the plan is for {plan.num_gpus}: "
            "price it on a profile of the plan's size"
        )
    return _priced(found.model(model), profile, plan.training, plan.parallel, notes)
