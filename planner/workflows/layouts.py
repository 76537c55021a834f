"""The commands' common layout flags as what they are: shorthands for dotted paths of a plan document
(``--tp 2`` is ``--set parallel.tp=2``), applied by one mechanism (``planner.overrides``) to a plan or,
without one, to the schema's defaults."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from planner.costmodel.dispatchers import spec_for
from planner.errors import SpecError
from planner.overrides import delay_follows_overlap, set_dotted
from planner.schema import ParallelConfig, TrainingSpec
from planner.specfiles import format_validation_error, validate_spec

__all__ = [
    "SHORTHANDS",
    "assign",
    "default_document",
    "layout_from",
    "shorthand_assignments",
    "validated_layout",
]

SHORTHANDS: dict[str, str] = {
    "tp": "parallel.tp",
    "pp": "parallel.pp",
    "vpp": "parallel.vpp",
    "cp": "parallel.cp",
    "ep": "parallel.ep",
    "etp": "parallel.etp",
    "mbs": "parallel.micro_batch",
    "sequence_parallel": "parallel.sequence_parallel",
    "recompute": "parallel.recompute",
    "recompute_modules": "parallel.recompute_modules",
    "a2a_overlap": "parallel.a2a_overlap",
    "layers_per_stage": "parallel.layers_per_stage",
    "a2a_chunks": "parallel.dispatcher.num_chunks",
    "topology_aware_routing": "parallel.dispatcher.topology_aware_routing",
    "condense": "parallel.dispatcher.condense_fraction",
    "sequence_migration": "parallel.dispatcher.sequence_migration",
    "seq_len": "training.seq_len",
    "gbs": "training.global_batch",
    "precision": "training.precision",
    "routing": "training.routing",
    "capacity_factor": "training.capacity_factor",
}
"""Flag (as a Python name) -> the plan path it sets. ``dispatcher`` is special: a name sets the kind and
the backend (``deepep`` is the hierarchical kind on DeepEP)."""


def shorthand_assignments(**flags: Any) -> list[tuple[str, Any]]:
    """The dotted assignments of the flags the user gave (None: not given), in a stable order."""
    assignments: list[tuple[str, Any]] = []
    for name, value in flags.items():
        if value is None:
            continue
        value = getattr(value, "value", value)  # a StrEnum choice
        if name == "dispatcher":
            spec = spec_for(value)
            assignments += [
                ("parallel.dispatcher.kind", spec.kind),
                ("parallel.dispatcher.backend", spec.backend),
            ]
        else:
            assignments.append((SHORTHANDS[name], list(value) if isinstance(value, tuple | list) else value))
    return assignments


def default_document() -> dict[str, Any]:
    """The schema's default training settings and layout, as the plan document holds them."""
    return {
        "training": TrainingSpec().model_dump(mode="json"),
        "parallel": ParallelConfig().model_dump(mode="json"),
    }


def assign(document: dict[str, Any], assignments: Sequence[tuple[str, Any]]) -> None:
    """Set each dotted field of the document (its ``training`` and ``parallel``) in order."""
    for field, value in assignments:
        set_dotted(document, field, value, flag="--set", what="plan")


def validated_layout(document: dict[str, Any], world: int) -> tuple[TrainingSpec, ParallelConfig]:
    """The document's training settings and layout, validated, for ``world`` GPUs (the data-parallel
    degrees fill the rest)."""
    training = validate_spec(TrainingSpec, document["training"], "the training options")
    fields = {k: v for k, v in document["parallel"].items() if k not in ("dp", "edp")}
    try:
        parallel = ParallelConfig.for_world(world, **fields)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, "the parallel options", ParallelConfig)) from None
    return training, parallel


def layout_from(assignments: Sequence[tuple[str, Any]], world: int) -> tuple[TrainingSpec, ParallelConfig]:
    """The training settings and layout the assignments give on the schema's defaults, for ``world`` GPUs."""
    document = default_document()
    assign(document, assignments)
    training, parallel = validated_layout(document, world)
    moved = {path.split(".")[1] for path, _ in assignments if path.startswith("parallel.")}
    parallel = delay_follows_overlap(parallel, moved)
    if all(path != "training.precision" for path, _ in assignments):
        # Left unset, so that a GPU without BF16 trains in its own 16-bit format (feasibility.with_gpu_precision).
        training = TrainingSpec.model_validate(training.model_dump(exclude={"precision"}))
    return training, parallel
