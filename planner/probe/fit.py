"""Fit the Hockney (alpha-beta) model ``t = alpha + x / B`` to timed collectives.

``x`` is the bus-normalised size ``S x factor`` (``planner/probe/bandwidth.py``), so ``B`` comes out
as nccl-tests' bus bandwidth and the cost model reads the fit back unchanged
(``t = latency + S x factor / busbw``, ``planner/schema/hardware.py``).

Two steps, because the two parameters live at opposite ends of the size ladder:

1. **Bandwidth from the large messages.** ``beta`` is the least-squares slope of ``t`` on ``x`` over the
   sizes within 4x of the largest (at least the two largest). A slope, not ``x / t``: a fixed cost or
   a shaper's burst (a token bucket lets its first bytes through at line speed) shifts ``t`` by a
   constant and leaves the marginal cost per byte, the bandwidth, unchanged. Smaller messages stay
   out: at sizes near the burst they sit below that line and would tilt it, and a single fit over all
   sizes would let the many latency-bound small messages pull the slope.
2. **Latency given the bandwidth.** ``alpha`` minimises the *relative* residuals over every size,
   ``sum(((alpha + beta x_i - t_i) / t_i)^2)`` (closed form: a weighted mean of ``t_i - beta x_i`` with
   weights ``1 / t_i^2``), clamped at zero.

The fit reports the root-mean-square relative residual over all sizes, so a poor fit shows: above
:data:`POOR_FIT_RMS` the probe keeps the fit but flags it (``planner/probe/build.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["LARGE_SPAN", "POOR_FIT_RMS", "AlphaBeta", "fit_alpha_beta"]

LARGE_SPAN = 4
"""The bandwidth is fitted on sizes within this factor of the largest one."""
POOR_FIT_RMS = 0.25
"""A fit whose rms relative error exceeds this is flagged as poor. The cost model prices every collective
from its fit, so such a fit misprices a typical size by more than a quarter: more than the planner's own
error on published runs (README: 14.8% MAPE on the MoE runs, 4.7% on the dense ones), so a plan solved on
it would be dominated by the measurement's error, not the model's. Timings that are not alpha-beta shaped
end up above it: a busy host, or CPU ranks sharing too few cores (4 gloo ranks on 2 cores fit at 13-99%)."""


@dataclass(frozen=True)
class AlphaBeta:
    """A fitted alpha-beta model and how well it fits."""

    latency_us: float
    """alpha, microseconds."""
    bandwidth_gbps: float
    """1 / beta in GB/s (bus bandwidth when x is the bus-normalised size)."""
    rms_relative_error: float
    """Root-mean-square of (model - measured) / measured over the points."""
    points: int
    """How many (size, time) points the fit used."""

    @property
    def poor(self) -> bool:
        """Whether the fit's rms error exceeds :data:`POOR_FIT_RMS`."""
        return self.rms_relative_error > POOR_FIT_RMS

    def seconds(self, x_bytes: float) -> float:
        """Predicted time for a bus-normalised size."""
        return self.latency_us * 1e-6 + x_bytes / (self.bandwidth_gbps * 1e9)


def fit_alpha_beta(x_bytes: Sequence[float], seconds: Sequence[float]) -> AlphaBeta:
    """Fit ``t = alpha + beta x``: slope from the largest sizes, alpha by relative least squares over all."""
    if len(x_bytes) != len(seconds):
        raise ValueError(f"{len(x_bytes)} sizes but {len(seconds)} times")
    if len(set(x_bytes)) < 2:
        raise ValueError("an alpha-beta fit needs at least two distinct message sizes")
    if any(t <= 0 or not math.isfinite(t) for t in seconds) or any(x <= 0 for x in x_bytes):
        raise ValueError("sizes and times must be positive and finite")
    points = sorted(zip(x_bytes, seconds, strict=True))
    sizes = sorted({x for x, _ in points}, reverse=True)
    # Sizes within LARGE_SPAN of the largest, and at least the two largest distinct sizes (sizes rounded to
    # whole elements are not exact multiples, and two shapes can have the same FLOPs).
    floor = min(sizes[0] / LARGE_SPAN, sizes[1])
    large = [p for p in points if p[0] >= floor]
    mean_x = sum(x for x, _ in large) / len(large)
    mean_t = sum(t for _, t in large) / len(large)
    spread = sum((x - mean_x) ** 2 for x, _ in large)
    if spread == 0:
        raise ValueError("an alpha-beta fit needs at least two distinct message sizes")
    beta = sum((x - mean_x) * (t - mean_t) for x, t in large) / spread
    if beta <= 0:
        raise ValueError("time does not grow with size over the largest sizes (a flat or falling curve)")
    weights = [1.0 / (t * t) for t in seconds]
    alpha = sum(w * (t - beta * x) for w, x, t in zip(weights, x_bytes, seconds, strict=True)) / sum(weights)
    alpha = max(alpha, 0.0)
    residuals = [(alpha + beta * x - t) / t for x, t in zip(x_bytes, seconds, strict=True)]
    rms = math.sqrt(sum(r * r for r in residuals) / len(residuals))
    return AlphaBeta(
        latency_us=alpha * 1e6, bandwidth_gbps=1.0 / beta / 1e9, rms_relative_error=rms, points=len(residuals)
    )
