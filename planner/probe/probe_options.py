"""What a launcher tells every probe rank, and how rank 0 reports progress (torch-free: the parent of a
``--nproc`` or ``--testbed`` probe imports this without importing torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt

from planner.schema._base import Spec

__all__ = ["ProbeOptions"]


class ProbeOptions(Spec):
    """What every rank needs to know to run its part of the probe."""

    backend: Literal["gloo", "nccl"]
    budget_s: PositiveFloat
    """Seconds the whole probe may take, launch included."""
    started: float
    """Wall-clock epoch seconds at which the probe was launched (the budget counts from there)."""
    command: str
    """The command line, for the profile's provenance."""
    min_bytes: PositiveInt = 1024
    """Smallest message (nccl-tests' S) of every series."""
    max_bytes: PositiveInt = 64 * 2**20
    """Largest message; the budget usually stops a series earlier."""
    results_path: str | None = None
    """Where rank 0 writes the record as JSON (launched ranks); None when the caller takes it directly."""
    timeout_s: PositiveFloat = Field(default=120.0)
    """Collective timeout: a dead rank makes the others fail after this long instead of hanging."""
