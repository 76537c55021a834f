"""Fit the GEMM time model ``t = t0 + FLOPs / (fraction * peak)`` to measured cuBLAS throughput.

The cost model prices every GEMM as a fixed per-kernel cost t0 (launch, tile ramp-up, wave
quantisation of small problems) plus FLOPs at a sustained fraction of the dense peak, the same
latency-bandwidth form as the alpha-beta model of a link. This script fits ``fraction`` and ``t0`` by
least squares on the relative time error over OpenXLA's measured sm_90 (H100) BF16 table
(``benchmarks/data/xla_sm90_bf16_gemm.csv``) and prints the fit and its residuals; the result is what
``planner/catalog/data/gpus.yaml`` records for Hopper GPUs. ``--data`` fits another table of the same
columns: ``benchmarks/data/azure_a100_fp16_gemm.csv`` (Azure's A100 cuBLASLt rows, ``--peak-tflops 312``)
gives what it records for the A100 and A800.

``--curve`` prints instead the measured points a GPU's ``gemm_curve_bf16`` records: (FLOPs, fraction of
the peak) of every row whose dimensions are all at least ``CURVE_MIN_DIM``, in increasing FLOPs. A flat
fraction with a fixed cost fits the H100 table (which stops at 4096^3) within its noise, but not the
A100's: there the fraction grows from 0.73 at 4096^3 to 0.81 at 8192^3 and 0.82 at 16384^3, a growth no
fixed per-kernel cost makes (it is wave and tile quantisation), so ``planner/catalog/data/gpus.yaml``
records the A100's and A800's points (``python benchmarks/fit_gemm_efficiency.py --curve --data
benchmarks/data/azure_a100_fp16_gemm.csv --peak-tflops 312``). Rows with a dimension under 1024 (the
table's 802816 x 192 x 768) are left out: the curve is indexed by FLOPs alone, and a skinny GEMM runs at
another fraction than a square one of its FLOPs; transformer layers' GEMMs have no such dimension.

Usage: python benchmarks/fit_gemm_efficiency.py [--data CSV] [--peak-tflops 989.5] [--curve]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

DATA = Path(__file__).parent / "data" / "xla_sm90_bf16_gemm.csv"
CURVE_MIN_DIM = 1024
"""Rows with a smaller dimension are left out of a curve indexed by FLOPs alone."""


def load(data: Path = DATA) -> list[tuple[float, float]]:
    """(FLOPs, measured seconds) per GEMM."""
    rows = []
    with data.open() as handle:
        for row in csv.DictReader(line for line in handle if not line.startswith("#")):
            flops = 2.0 * int(row["b"]) * int(row["m"]) * int(row["n"]) * int(row["k"])
            rows.append((flops, flops / float(row["flops_per_s"])))
    return rows


def curve(data: Path, peak: float) -> list[tuple[float, float]]:
    """(FLOPs, fraction of ``peak``) of every row whose dimensions are all at least ``CURVE_MIN_DIM``, in
    increasing FLOPs, the fraction to three decimals (what the catalog records)."""
    points = []
    with data.open() as handle:
        for row in csv.DictReader(line for line in handle if not line.startswith("#")):
            m, n, k = int(row["m"]), int(row["n"]), int(row["k"])
            if min(m, n, k) < CURVE_MIN_DIM:
                continue
            points.append((2.0 * int(row["b"]) * m * n * k, round(float(row["flops_per_s"]) / peak, 3)))
    return sorted(points)


def fit(rows: list[tuple[float, float]], peak: float) -> tuple[float, float, float]:
    """Grid search (fine enough for two parameters): minimise the mean squared relative error."""
    best = (float("inf"), 0.0, 0.0)
    for f_step in range(500, 1001):
        fraction = f_step / 1000
        for t0_step in range(0, 301):
            t0 = t0_step * 0.1e-6
            err = sum(((t0 + f / (fraction * peak)) / t - 1) ** 2 for f, t in rows) / len(rows)
            if err < best[0]:
                best = (err, fraction, t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--peak-tflops", type=float, default=989.5, help="dense BF16 peak of the GPU measured"
    )
    parser.add_argument("--data", type=Path, default=DATA, help="measured GEMMs (b,m,n,k,flops_per_s)")
    parser.add_argument("--curve", action="store_true", help="print the measured points (gemm_curve_bf16)")
    args = parser.parse_args()
    peak = args.peak_tflops * 1e12
    if args.curve:
        points = ", ".join(f"[{flops:.0f}, {fraction}]" for flops, fraction in curve(args.data, peak))
        print(f"gemm_curve_bf16: [{points}]")
        return
    rows = load(args.data)
    mse, fraction, t0 = fit(rows, peak)
    print(
        f"{len(rows)} measured GEMMs; fit: fraction = {fraction:.3f} of {args.peak_tflops} TFLOP/s, t0 = {t0 * 1e6:.1f} us"
    )
    print(f"rms relative time error {mse**0.5:.1%}")
    worst = sorted(rows, key=lambda r: -abs((t0 + r[0] / (fraction * peak)) / r[1] - 1))[:5]
    for flops, seconds in worst:
        predicted = t0 + flops / (fraction * peak)
        print(f"  {flops:10.3g} FLOPs: measured {seconds * 1e6:8.1f} us, model {predicted * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
