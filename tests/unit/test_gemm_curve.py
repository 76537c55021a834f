"""A GPU's measured GEMM curve (``ComputeEfficiency.gemm_curve_bf16``, issue 17 item 3): the A100's fraction of
its peak grows from 0.73 at 4096^3 to 0.82 at 16384^3 (Azure's cuBLASLt table), which no flat fraction with a
fixed per-kernel cost prices, so the catalog records the measured points and the cost model interpolates."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import yaml

from planner.accuracy.calibrate import _scale_fractions
from planner.catalog import load_cluster, load_gpu
from planner.costmodel.compute import gemm_curve_fraction, gemm_time, sustained_cluster
from planner.overrides import apply_what_if
from tests.conftest import REPO

CURVE = ((1e9, 0.4), (1e11, 0.7), (1e13, 0.8))


def test_the_fraction_is_linear_in_log_flops_between_points_and_flat_beyond() -> None:
    assert gemm_curve_fraction(CURVE, 1e8) == 0.4 and gemm_curve_fraction(CURVE, 1e15) == 0.8
    assert gemm_curve_fraction(CURVE, 1e9) == pytest.approx(0.4)
    assert gemm_curve_fraction(CURVE, 1e10) == pytest.approx(0.55)  # half-way in log FLOPs
    assert gemm_curve_fraction(CURVE, 1e12) == pytest.approx(0.75)


def test_the_catalog_curve_is_what_the_script_prints_from_the_measured_table() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "fit_gemm_efficiency.py"), "--curve", "--data",
         str(REPO / "benchmarks" / "data" / "azure_a100_fp16_gemm.csv"), "--peak-tflops", "312"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    printed = tuple(tuple(point) for point in yaml.safe_load(done.stdout)["gemm_curve_bf16"])
    for name in ("A100-SXM-40GB", "A100-SXM-80GB", "A800-SXM-80GB"):
        efficiency = load_gpu(name).efficiency
        assert efficiency is not None and efficiency.gemm_curve_bf16 == printed, name
    # The 802816 x 192 x 768 row is left out (a skinny GEMM; the curve is indexed by FLOPs alone).
    assert len(printed) == 7 and all(flops != 2.0 * 802816 * 192 * 768 for flops, _ in printed)


def test_a100_gemms_are_priced_from_the_curve_at_their_size() -> None:
    gpu = load_gpu("A100-SXM-80GB")
    peak = 312e12
    for flops in (1.374e11, 1.1e12):  # 4096^3 and 8192^3 as one kernel each: the measured fractions
        measured = 0.731 if flops < 1e12 else 0.813
        assert gemm_time(flops, 1, gpu, "bf16") == pytest.approx(flops / (peak * measured), rel=2e-3)
    # Ten kernels of a layer share its FLOPs: each is priced at the mean kernel's fraction.
    assert gemm_time(1.1e13, 10, gpu, "bf16") == pytest.approx(1.1e13 / (peak * 0.813), rel=2e-3)
    # Bigger GEMMs run at a larger fraction: twice the FLOPs take less than twice the time.
    assert gemm_time(2 * 1.374e11, 1, gpu, "bf16") < 2 * gemm_time(1.374e11, 1, gpu, "bf16")


def test_a_gpu_without_a_curve_keeps_its_flat_fraction_and_fixed_cost() -> None:
    gpu = load_gpu("H100-SXM")
    assert gpu.efficiency is not None and gpu.efficiency.gemm_curve_bf16 is None
    eff = gpu.efficiency
    expected = eff.gemm_overhead_us * 1e-6 + 1e12 / (989.5e12 * eff.gemm_fraction_bf16)
    assert gemm_time(1e12, 1, gpu, "bf16") == pytest.approx(expected)


def test_training_sustains_the_same_share_of_every_point() -> None:
    cluster = load_cluster("a800-2x8")
    measured, sustained = cluster.gpu.efficiency, sustained_cluster(cluster).gpu.efficiency
    assert measured is not None and sustained is not None
    assert measured.gemm_curve_bf16 is not None and sustained.gemm_curve_bf16 is not None
    ratios = {
        round(s[1] / m[1], 9)
        for m, s in zip(measured.gemm_curve_bf16, sustained.gemm_curve_bf16, strict=True)
    }
    assert ratios == {round(sustained.gemm_fraction_bf16 / measured.gemm_fraction_bf16, 9)}


def test_a_what_if_of_the_flat_fraction_prices_every_gemm_at_it() -> None:
    # "What if GEMMs ran at 0.5 of the peak": the curve is set aside, not left to override the question.
    changed = apply_what_if(load_cluster("a800-2x8"), [("gemm_fraction_bf16", 0.5)])
    assert changed.gpu.efficiency is not None and changed.gpu.efficiency.gemm_curve_bf16 is None
    assert gemm_time(1e12, 1, changed.gpu, "bf16") == pytest.approx(
        changed.gpu.efficiency.gemm_overhead_us * 1e-6 + 1e12 / (312e12 * 0.5)
    )


def test_calibration_scales_the_curve_with_the_flat_fraction() -> None:
    document = load_cluster("a800-2x8").model_dump(mode="json")
    before = [list(point) for point in document["gpu"]["efficiency"]["gemm_curve_bf16"]]
    _scale_fractions("gemm_efficiency", ("gemm_fraction_bf16",))(document, 1.1)
    after = document["gpu"]["efficiency"]["gemm_curve_bf16"]
    assert [a[0] for a in after] == [b[0] for b in before]
    assert all(math.isclose(a[1], min(1.0, b[1] * 1.1)) for a, b in zip(after, before, strict=True))
