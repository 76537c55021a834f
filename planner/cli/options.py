"""Choices and options the commands share. Defaults live in the schema: an option left out is None and
the schema's default applies (``moeplan schema plan``)."""

from enum import StrEnum
from typing import Annotated, Any

import typer

from planner.costmodel.dispatchers import dispatcher_names
from planner.emit import FORMATS
from planner.overrides import parse_assignment

__all__ = [
    "BackendChoice",
    "DefaultClusterOpt",
    "DispatcherChoice",
    "EmitFormat",
    "GbsOpt",
    "NodesOpt",
    "Opt",
    "PrecisionChoice",
    "PrecisionOpt",
    "RecomputeChoice",
    "RoutingChoice",
    "SeqLenOpt",
    "SetOpt",
    "set_assignments",
]

Opt = typer.Option

DispatcherChoice = StrEnum("DispatcherChoice", {name.upper(): name for name in dispatcher_names()})  # type: ignore[misc]
"""The cost model's dispatcher names: its kinds and their kernel libraries (``dispatchers.spec_for``)."""
EmitFormat = StrEnum("EmitFormat", {name.upper().replace("-", "_"): name for name in FORMATS})  # type: ignore[misc]
"""The launch formats of ``planner.emit.FORMATS``."""


class RecomputeChoice(StrEnum):
    NONE = "none"
    SELECTIVE = "selective"
    FULL = "full"


class StateDtypeChoice(StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"


class PrecisionChoice(StrEnum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP8 = "fp8"
    MXFP8 = "mxfp8"


class FrameworkChoice(StrEnum):
    MEGATRON = "megatron"
    TORCHTITAN = "torchtitan"
    MOEPLAN = "moeplan"


class RoutingChoice(StrEnum):
    BALANCED = "balanced"
    DROPLESS = "dropless"
    CAPACITY = "capacity"


class BackendChoice(StrEnum):
    AUTO = "auto"
    GLOO = "gloo"
    NCCL = "nccl"


DefaultClusterOpt = Annotated[
    str | None, Opt("--cluster", help="Profile name or file; default: the last probe, else a800-2x8.")
]
NodesOpt = Annotated[int | None, Opt("--nodes", help="Override the node count.")]
SeqLenOpt = Annotated[int | None, Opt("--seq-len", help="Sequence length (default 4096).")]
GbsOpt = Annotated[int | None, Opt("--gbs", help="Global batch size (default 1024).")]
PrecisionOpt = Annotated[PrecisionChoice | None, Opt("--precision", help="GEMM precision.")]
SetOpt = Annotated[
    list[str] | None,
    Opt(
        "--set",
        help="Change a plan setting by its dotted path, FIELD=VALUE (repeat), e.g. parallel.tp=2 or "
        "training.seq_len=8192; the layout flags are shorthands for such paths.",
    ),
]


def set_assignments(texts: list[str] | None) -> list[tuple[str, Any]]:
    """The ``--set FIELD=VALUE`` assignments, parsed (VALUE as YAML: ``2`` is a number)."""
    return [parse_assignment(text, "--set", "parallel.tp=2") for text in texts or []]
