"""Physical ranges of the specs' numbers: each bounded field names one, so a figure no hardware or model
has (a bandwidth of 5e-324 GB/s, a hidden size of 10^400, 10^9 nodes) is refused where it is read, not
turned into an infinity, an overflow or an endless search downstream. The bounds are generous: orders of
magnitude beyond any machine or model built by 2026, below where the cost model's arithmetic breaks.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

__all__ = [
    "MAX_WORLD_SIZE",
    "Bandwidth",
    "Count",
    "GpusPerNode",
    "HostMicroseconds",
    "Latency",
    "Memory",
    "NodeCount",
    "Seconds",
    "Tflops",
    "Width",
]

Bandwidth = Annotated[float, Field(ge=1e-6, le=1e5)]
"""GB/s per GPU or per node: from 1 kB/s (a link that barely moves data) to 100 TB/s (HBM is 8)."""
Latency = Annotated[float, Field(ge=0, le=1e7)]
"""Microseconds per operation, up to 10 s."""
Tflops = Annotated[float, Field(gt=0, le=1e6)]
"""Dense peak, TFLOP/s (a GB300 has 5,000 in FP8)."""
Memory = Annotated[float, Field(gt=0, le=1e6)]
"""GiB of device or host memory (a GB300 has 279; a node's host up to a few TiB)."""
HostMicroseconds = Annotated[float, Field(ge=0, le=1e6)]
"""Host time per kernel, microseconds, up to a second."""
Seconds = Annotated[float, Field(ge=0, le=1e5)]
"""Host time per step outside the priced work, seconds, up to a day."""
NodeCount = Annotated[int, Field(gt=0, le=100_000)]
"""Nodes (scale-up domains) of a cluster: the largest trained on have tens of thousands of GPUs."""
GpusPerNode = Annotated[int, Field(gt=0, le=1_024)]
"""GPUs in one scale-up domain (an NVL72 rack has 72; NVL576 would have 576)."""
MAX_WORLD_SIZE = 1_000_000
"""GPUs a cluster may have (nodes x GPUs per node): the search enumerates the layouts of the world."""
Width = Annotated[int, Field(gt=0, le=1_000_000)]
"""A model dimension (hidden, FFN, expert widths, head and latent dimensions)."""
Count = Annotated[int, Field(gt=0, le=1_000_000)]
"""Layers, heads, experts, and the like."""
