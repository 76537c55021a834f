"""The launch formats ``moeplan emit`` knows, by name: each renders a plan (and, where the format needs
the model's shape, its model) as text. The CLI lists them from here; a new format is one entry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from planner.emit.megatron import DEFAULT_MEGATRON_VERSION, emit_megatron
from planner.emit.plan_json import emit_plan_json
from planner.emit.scripts import SlurmOptions, emit_slurm, emit_torchrun
from planner.emit.torchtitan import TORCHTITAN_VERSION, emit_torchtitan
from planner.errors import SpecError
from planner.schema import ModelSpec, Plan

__all__ = ["FORMATS", "EmitFormat", "EmitRequest", "emit"]


@dataclass(frozen=True, slots=True)
class EmitRequest:
    """What a format may use: the plan, where it is kept (the scripts name it), its model (loaded only by
    formats that need it) and the Megatron-Core release to target."""

    plan: Plan
    plan_path: str
    load_model: Callable[[], ModelSpec]
    megatron_version: str = DEFAULT_MEGATRON_VERSION
    slurm: SlurmOptions = SlurmOptions()
    """The Slurm script's scheduler options and what it launches."""


@dataclass(frozen=True, slots=True)
class EmitFormat:
    """One launch format."""

    name: str
    description: str
    render: Callable[[EmitRequest], str]


FORMATS: dict[str, EmitFormat] = {
    f.name: f
    for f in (
        EmitFormat(
            "plan-json",
            "the plan document: canonical JSON (sorted keys, stable bytes)",
            lambda r: emit_plan_json(r.plan),
        ),
        EmitFormat(
            "megatron",
            "Megatron-LM flags and environment, as a bash snippet (MEGATRON_ARGS array)",
            lambda r: emit_megatron(r.plan, r.load_model(), r.megatron_version),
        ),
        EmitFormat(
            "torchtitan",
            f"torchtitan {TORCHTITAN_VERSION} command-line overrides, as a bash snippet (TORCHTITAN_ARGS array)",
            lambda r: emit_torchtitan(r.plan, r.load_model()),
        ),
        EmitFormat(
            "torchrun",
            "a torchrun command starting moeplan's runtime on every node of the plan's node shape",
            lambda r: emit_torchrun(r.plan, plan_path=r.plan_path),
        ),
        EmitFormat(
            "slurm",
            "an sbatch script for the plan's nodes: one srun task per node, each a torchrun of moeplan's runtime, "
            "(--launch megatron) of Megatron-LM's pretrain_gpt.py or (--launch torchtitan) of torchtitan.train "
            "with the plan's arguments",
            lambda r: emit_slurm(
                r.plan,
                plan_path=r.plan_path,
                options=r.slurm,
                framework_snippet=_framework_snippet(r),
            ),
        ),
    )
}
"""Launch formats by name, in the order ``moeplan emit --help`` lists them."""


def _framework_snippet(request: EmitRequest) -> str | None:
    """The arguments a Slurm script's launch needs: Megatron-LM's or torchtitan's, none for the runtime."""
    if request.slurm.launch == "megatron":
        return emit_megatron(request.plan, request.load_model(), request.megatron_version)
    if request.slurm.launch == "torchtitan":
        return emit_torchtitan(request.plan, request.load_model())
    return None


def emit(name: str, request: EmitRequest) -> str:
    """The plan in the named format; SpecError naming the known formats for any other name."""
    found = FORMATS.get(name)
    if found is None:
        raise SpecError(f"emit format '{name}' is unknown; known: {', '.join(FORMATS)}.")
    return found.render(request)
