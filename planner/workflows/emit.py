"""``moeplan emit`` as a workflow: a plan file in a launch format, from the plan alone (its node shape
for the scripts, its recorded model for the formats that need the model's shape)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from planner.emit import DEFAULT_MEGATRON_VERSION, EmitRequest, emit
from planner.schema import ModelSpec, Plan
from planner.workflows.plans import read_plan

__all__ = ["emit_plan", "emit_plan_file"]


def emit_plan(
    fmt: str,
    plan: Plan,
    plan_path: str,
    load_model: Callable[[], ModelSpec],
    megatron_version: str | None = None,
) -> str:
    """The plan in format ``fmt`` (``plan_path``: where the scripts will find the plan)."""
    return emit(fmt, EmitRequest(plan, plan_path, load_model, megatron_version or DEFAULT_MEGATRON_VERSION))


def emit_plan_file(plan_path: Path, fmt: str, megatron_version: str | None = None) -> str:
    """A plan file in format ``fmt``."""
    found = read_plan(plan_path)
    return emit_plan(fmt, found.plan, str(plan_path), found.model, megatron_version)
