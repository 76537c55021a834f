"""TrainingSpec: what is trained, independent of how it is split (sequence, batch, precision, routing)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PositiveFloat, model_validator

from planner.schema._base import Spec

__all__ = ["Precision", "RoutingMode", "TrainingSpec"]

Precision = Literal["bf16", "fp16", "fp8", "mxfp8"]
RoutingMode = Literal["balanced", "dropless", "capacity"]


class TrainingSpec(Spec):
    """Sequence length, global batch, precision and routing mode of a training run."""

    seq_len: Annotated[int, Field(gt=0, le=100_000_000)] = 4096
    """Tokens per sequence (``--seq-length``)."""
    global_batch: Annotated[int, Field(gt=0, le=1_000_000_000)] = 1024
    """Sequences per optimizer step (``--global-batch-size``)."""
    precision: Precision = "bf16"
    """GEMM precision: bf16; fp16 (with loss scaling: GPUs without BF16, such as V100); or fp8/mxfp8 (the
    GPU's FP8 peak), where parameters and activations stay bf16. Which ones a GPU has is a rule of
    ``planner.feasibility``."""
    routing: RoutingMode = "dropless"
    """``balanced`` (forced even expert load, as most published benchmarks), ``dropless`` (real routing,
    no token dropped; Megatron's default), or ``capacity`` (tokens over ``capacity_factor`` are dropped)."""
    capacity_factor: PositiveFloat | None = None
    """Expert capacity as a multiple of the even share (``--moe-expert-capacity-factor``).
    Rule: given exactly when ``routing`` is ``capacity``."""

    @model_validator(mode="after")
    def _capacity_factor_with_capacity_routing(self) -> TrainingSpec:
        if self.routing == "capacity" and self.capacity_factor is None:
            raise ValueError("routing is 'capacity', so capacity_factor must be given")
        if self.routing != "capacity" and self.capacity_factor is not None:
            raise ValueError(f"capacity_factor is only used with routing 'capacity', not '{self.routing}'")
        return self
