"""``moeplan emit`` as a workflow: a plan file in a launch format, from the plan alone (its node shape
for the scripts, its recorded model for the formats that need the model's shape)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from planner.emit import DEFAULT_MEGATRON_VERSION, EmitRequest, SlurmOptions, emit
from planner.feasibility import require_feasible
from planner.schema import ModelSpec, Plan
from planner.workflows.plans import read_plan

__all__ = ["emit_plan", "emit_plan_file"]


def emit_plan(
    fmt: str,
    plan: Plan,
    plan_path: str,
    load_model: Callable[[], ModelSpec],
    megatron_version: str | None = None,
    slurm: SlurmOptions | None = None,
) -> str:
    """The plan in format ``fmt`` (``plan_path``: where the scripts will find the plan, made absolute: a
    script runs from wherever the scheduler starts it)."""
    where = str(Path(plan_path).absolute())
    request = EmitRequest(
        plan, where, load_model, megatron_version or DEFAULT_MEGATRON_VERSION, slurm or SlurmOptions()
    )
    return emit(fmt, request)


def emit_plan_file(
    plan_path: Path, fmt: str, megatron_version: str | None = None, slurm: SlurmOptions | None = None
) -> str:
    """A plan file in format ``fmt``, once it is checked: a plan file is input like any other, and its
    model must resolve and its layout meet the rules ``solve`` keeps (``planner.feasibility``; Megatron-LM's
    own apply where the format is Megatron-LM's), before anything is written for it."""
    found = read_plan(plan_path)
    plan, model = found.plan, found.model()
    megatron = fmt == "megatron" or (fmt == "slurm" and slurm is not None and slurm.launch == "megatron")
    require_feasible(model, plan.training, plan.parallel, plan.num_gpus, megatron=megatron)
    return emit_plan(fmt, plan, str(plan_path), lambda: model, megatron_version, slurm)
