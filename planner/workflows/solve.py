"""``moeplan solve`` as a workflow: resolve the inputs, solve, record where they came from, and answer a
``--what-if`` by solving again on the changed profile."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from planner.catalog import ResolvedCluster, resolve_cluster, resolve_model
from planner.errors import InfeasiblePlanError, SpecError
from planner.frameworks import MODEL_ALTERING, techniques
from planner.overrides import apply_what_if
from planner.schema import ClusterProfile, ClusterRef, ModelSpec, Plan, TrainingSpec

if TYPE_CHECKING:
    from planner.search import SolveProgress

__all__ = ["SolveOutcome", "SolveRequest", "solve_plan"]


@dataclass(frozen=True)
class SolveRequest:
    """What the user asked ``moeplan solve`` for (options as the search takes them)."""

    model: str
    cluster: str | None
    nodes: int | None
    training: TrainingSpec
    options: Any
    """``planner.search.SearchOptions``."""
    time_limit_s: float = 60.0
    gap: float = 1e-6
    exhaustive: bool = False
    top_k: int = 5
    what_if: tuple[tuple[str, Any], ...] = ()
    progress: Callable[[SolveProgress], None] | None = None
    """Called as each search goes (the plan's, then the what-if's, each counting from zero)."""


@dataclass(frozen=True)
class SolveOutcome:
    """The plan, the best plans of other structures, the profile, and the what-if comparison if asked."""

    plan: Plan
    alternatives: tuple[Any, ...]
    """``planner.search.Alternative``s, best first."""
    profile: ClusterProfile
    note: str | None = None
    """Which profile was used when none was named."""
    offers: str | None = None
    """How the offered model-altering techniques fared: the plan with one against the best without."""
    what_if: dict[str, Any] | None = field(default=None)


MAX_TIME_LIMIT_S = 7 * 24 * 3600.0
"""Longest solver time limit taken (a week): beyond it a limit is a typo, and HiGHS takes no infinity."""


def check_solver_limits(time_limit_s: float, gap: float, top_k: int) -> None:
    """The solver's options, each a finite number in its range (exit 2 otherwise)."""
    if not (math.isfinite(time_limit_s) and 0 < time_limit_s <= MAX_TIME_LIMIT_S):
        raise SpecError(
            f"--time-limit ({time_limit_s}) must be above 0 and at most {MAX_TIME_LIMIT_S:g} seconds."
        )
    if not (math.isfinite(gap) and 0 <= gap < 1):
        raise SpecError(f"--gap ({gap}) must be a relative optimality gap, at least 0 and below 1.")
    if top_k < 0:
        raise SpecError(f"--top-k ({top_k}) must be 0 or more.")


def solve_plan(request: SolveRequest) -> SolveOutcome:
    """Solve, recording the inputs' sources in the plan; the what-if profile is checked before solving."""
    from planner.search import solve  # the solver brings PuLP (~0.2 s), which other commands skip

    check_solver_limits(request.time_limit_s, request.gap, request.top_k)

    model, model_ref = resolve_model(request.model)
    resolved = resolve_cluster(request.cluster, request.nodes)
    changed = apply_what_if(resolved.profile, request.what_if) if request.what_if else None
    result = solve(
        model, request.training, resolved.profile, request.options, time_limit_s=request.time_limit_s,
        gap=request.gap, exhaustive=request.exhaustive, top_k=request.top_k, model_ref=model_ref,
        cluster_ref=resolved.ref, progress=request.progress,
    )  # fmt: skip
    comparison = None
    if changed is not None:
        comparison = _what_if(model, request, resolved, changed, result.plan)
    offers = _offers(model, request, resolved, result.plan)
    return SolveOutcome(
        result.plan, result.alternatives, resolved.profile, resolved.note, offers=offers, what_if=comparison
    )


def _offers(model: ModelSpec, request: SolveRequest, resolved: ResolvedCluster, plan: Plan) -> str | None:
    """The offered techniques against the best plan without any (solved again without them when the plan
    carries one), so that the user sees what the change to the model buys."""
    from planner.search import alters_model, solve

    options = request.options
    names = [MODEL_ALTERING[field][0] for field in techniques(options)]
    if not names:
        return None
    assert plan.estimate is not None
    if not alters_model(plan.parallel):
        return (
            f"Offered {', '.join(names)}: no plan with it is faster than {plan.estimate.step_time_s:.4g} s without, "
            "so the plan does not carry it."
        )
    plain = replace(options, topology_aware_routing=False, condense_fraction=0.0, sequence_migration=False)
    try:
        base = solve(
            model, request.training, resolved.profile, plain, time_limit_s=request.time_limit_s, gap=request.gap,
            exhaustive=request.exhaustive, model_ref=plan.model, cluster_ref=resolved.ref,
        ).plan  # fmt: skip
    except InfeasiblePlanError as exc:
        return f"Offered {', '.join(names)}: the plan carries it; without, no plan fits ({exc})"
    assert base.estimate is not None
    carried = [MODEL_ALTERING[field][0] for field in techniques(plan.parallel.dispatcher)]
    gain = base.estimate.step_time_s / plan.estimate.step_time_s - 1
    return (
        f"Offered {', '.join(names)}: the plan carries {', '.join(carried)} at {plan.estimate.step_time_s:.4g} s "
        f"per step; the best plan without it takes {base.estimate.step_time_s:.4g} s ({gain:+.1%} slower)."
    )


def _what_if(
    model: ModelSpec, request: SolveRequest, resolved: ResolvedCluster, changed: ClusterProfile, plan: Plan
) -> dict[str, Any]:
    """The plan on the changed profile and how it differs from ``plan`` (JSON-ready)."""
    from planner.accuracy.golden import layout_changes
    from planner.emit import emit_plan_json
    from planner.search import solve

    said = dict(request.what_if)
    derived = ClusterRef(name=f"{resolved.profile.name} (what-if)", source="derived")
    try:
        other = solve(
            model, request.training, changed, request.options, time_limit_s=request.time_limit_s,
            gap=request.gap, exhaustive=request.exhaustive, model_ref=plan.model, cluster_ref=derived,
            progress=request.progress,
        ).plan  # fmt: skip
    except InfeasiblePlanError as exc:
        return {
            "assignments": said,
            "plan": None,
            "infeasible": str(exc),
            "changes": [],
            "relative_change": None,
        }
    assert plan.estimate is not None and other.estimate is not None
    return {
        "assignments": said,
        "plan": json.loads(emit_plan_json(other)),
        "infeasible": None,
        "changes": [
            {"field": c.field, "before": c.expected, "after": c.actual} for c in layout_changes(plan, other)
        ],
        "relative_change": other.estimate.step_time_s / plan.estimate.step_time_s - 1,
    }
