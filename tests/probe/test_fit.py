"""The alpha-beta fit and nccl-tests' bandwidth conventions."""

from __future__ import annotations

import random

import pytest

from planner.probe.bandwidth import algbw_gbps, bus_factor, busbw_gbps
from planner.probe.fit import POOR_FIT_RMS, fit_alpha_beta


@pytest.mark.parametrize(
    ("kind", "n", "factor"),
    [
        ("all_reduce", 8, 2 * 7 / 8),
        ("all_reduce", 2, 1.0),
        ("all_gather", 4, 3 / 4),
        ("reduce_scatter", 16, 15 / 16),
        ("all_to_all", 8, 7 / 8),
        ("all_to_all_v", 4, 3 / 4),
        ("send_recv", 8, 1.0),
    ],
)
def test_bus_factors_are_nccl_tests(kind: str, n: int, factor: float) -> None:
    assert bus_factor(kind, n) == pytest.approx(factor)  # type: ignore[arg-type]


def test_busbw_from_a_published_point() -> None:
    # nccl-tests all_reduce, 8 GPUs, 8 GiB in 61 ms -> algbw 140.8, busbw 246.4 GB/s.
    size, seconds = 8 * 2**30, 0.061
    assert algbw_gbps(size, seconds) == pytest.approx(140.82, rel=1e-3)
    assert busbw_gbps("all_reduce", 8, size, seconds) == pytest.approx(246.4, rel=1e-3)


def test_bus_factor_needs_two_ranks() -> None:
    with pytest.raises(ValueError, match="at least 2 ranks"):
        bus_factor("all_gather", 1)


def _ladder(
    alpha_s: float, bw_bps: float, noise: float = 0.0, seed: int = 0
) -> tuple[list[float], list[float]]:
    rng = random.Random(seed)
    xs = [2.0**k for k in range(10, 27, 2)]
    return xs, [(alpha_s + x / bw_bps) * (1 + rng.uniform(-noise, noise)) for x in xs]


def test_fit_recovers_exact_parameters() -> None:
    xs, ts = _ladder(25e-6, 24e9)
    fit = fit_alpha_beta(xs, ts)
    assert fit.latency_us == pytest.approx(25.0, rel=1e-6)
    assert fit.bandwidth_gbps == pytest.approx(24.0, rel=1e-6)
    assert fit.rms_relative_error < 1e-9
    assert fit.seconds(2**20) == pytest.approx(25e-6 + 2**20 / 24e9)


def test_fit_with_noise_stays_close() -> None:
    xs, ts = _ladder(50e-6, 12.5e6, noise=0.05, seed=3)
    fit = fit_alpha_beta(xs, ts)
    assert fit.bandwidth_gbps == pytest.approx(0.0125, rel=0.06)
    assert 0.0 < fit.rms_relative_error < 0.06


def test_a_shaper_burst_does_not_inflate_the_bandwidth() -> None:
    # A token bucket passes its first 64 KiB at once: t = alpha + (x - burst) / R beyond the burst.
    burst, rate = 64 * 2**10, 25e6
    xs = [2.0**k for k in range(10, 25, 2)]
    ts = [200e-6 + max(x - burst, 0.0) / rate + 1e-6 for x in xs]
    fit = fit_alpha_beta(xs, ts)
    assert fit.bandwidth_gbps == pytest.approx(0.025, rel=1e-6)
    # A single relative least-squares line over all sizes would have read a higher rate:
    # the small messages pull the intercept and the slope with it.
    assert fit.seconds(xs[-1]) == pytest.approx(ts[-1], rel=0.01)


def test_negative_latency_is_clamped_and_bandwidth_refitted() -> None:
    # Pure bandwidth plus noise that pulls the intercept below zero.
    xs = [1e3, 1e5, 1e7]
    ts = [0.9e-6, 1.0e-4, 1.0e-2]
    fit = fit_alpha_beta(xs, ts)
    assert fit.latency_us == 0.0
    assert fit.bandwidth_gbps == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize(
    ("xs", "ts", "message"),
    [
        ([1.0, 1.0], [1.0, 2.0], "two distinct"),
        ([1.0, 2.0], [1.0], "2 sizes but 1 times"),
        ([1.0, 2.0], [1.0, 0.0], "positive"),
        ([1e3, 1e6], [2.0, 1.0], "does not grow"),
    ],
)
def test_fit_rejects_bad_input(xs: list[float], ts: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fit_alpha_beta(xs, ts)


def test_repeated_largest_size_still_fits() -> None:
    # Two GEMM shapes with the same FLOPs at the top (1024^3 and 2048x512x1024).
    xs = [2 * 128**3, 2 * 512**3, 2 * 1024**3, 2 * 2048 * 512 * 1024]
    ts = [3e-6 + x / 5e10 for x in xs]
    fit = fit_alpha_beta(xs, ts)
    assert fit.bandwidth_gbps == pytest.approx(50.0, rel=1e-6)


@pytest.mark.parametrize(("noise", "poor"), [(0.0, False), (0.05, False), (0.6, True)])
def test_a_fit_above_the_rms_threshold_is_poor(noise: float, poor: bool) -> None:
    xs, ts = _ladder(50e-6, 12.5e6)
    # Alternate sizes slowed and sped by ``noise``: the slope stays positive, the rms error is about ``noise``.
    ts = [t * (1 + noise * (-1) ** i) for i, t in enumerate(ts)]
    fit = fit_alpha_beta(xs, ts)
    assert (fit.rms_relative_error > POOR_FIT_RMS) == poor == fit.poor
