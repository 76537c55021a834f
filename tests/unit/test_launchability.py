"""Launchability (issue 15 item 1): the pipeline schedule's micro-batch rules and what the GPU runs.

Each rule is shown broken and met; the solver's plans on the issue's cases obey them.
"""

from __future__ import annotations

import pytest

from planner.catalog import load_cluster, load_gpu, load_model
from planner.emit import emit_megatron
from planner.errors import InfeasiblePlanError, SpecError
from planner.feasibility import check_plan, num_microbatches, precision_rules, with_gpu_precision
from planner.schema import DispatcherSpec, ModelSpec, ParallelConfig, TrainingSpec
from planner.search import SearchOptions, solve
from planner.search.space import runnable_backends


def _broken(
    model: ModelSpec, training: TrainingSpec, world: int, gpu: str | None = None, **degrees: object
) -> list[str]:
    config = ParallelConfig.for_world(world, **degrees)
    return [str(v) for v in check_plan(model, training, config, world, load_gpu(gpu) if gpu else None)]


@pytest.mark.parametrize(
    ("gbs", "degrees", "expected"),
    [
        (8, {"pp": 4, "micro_batch": 1}, None),  # 8 micro-batches, pp 4: fills
        (
            4,
            {"pp": 4, "micro_batch": 2},
            "micro_batches (2) (global_batch 4 / (micro_batch 2 x dp 1)) must be at least pp (4)",
        ),
        (10, {"pp": 4, "vpp": 2, "micro_batch": 1}, "must be a multiple of pp (4) with vpp 2"),
        (16, {"pp": 4, "vpp": 2, "micro_batch": 1}, None),
        (3, {"pp": 1, "micro_batch": 1}, None),  # no pipeline: any count
    ],
)
def test_pipeline_micro_batch_rules(gbs: int, degrees: dict[str, int], expected: str | None) -> None:
    model = load_model("mixtral-8x7b")
    found = [
        v
        for v in _broken(model, TrainingSpec(global_batch=gbs), degrees["pp"], **degrees)
        if "micro_batches" in v
    ]
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and expected in found[0]


@pytest.mark.parametrize(
    ("gpu", "precision", "refused"),
    [
        ("A100-SXM-80GB", "fp8", "needs compute capability 8.9 or more"),
        ("H100-SXM", "fp8", None),
        ("H100-SXM", "mxfp8", "needs compute capability 10.0 or more"),
        ("B200", "mxfp8", None),
        ("V100-PCIe-16GB", "bf16", "needs compute capability 8.0 or more"),
        ("V100-PCIe-16GB", "fp16", None),
        ("A800-SXM-80GB", "fp16", None),
    ],
)
def test_precision_needs_the_gpu(gpu: str, precision: str, refused: str | None) -> None:
    found = [str(v) for v in precision_rules(TrainingSpec(precision=precision), load_gpu(gpu))]  # type: ignore[arg-type]
    if refused is None:
        assert found == []
    else:
        assert len(found) == 1 and refused in found[0] and "use --precision" in found[0]


def test_default_precision_is_the_gpus_own_and_a_given_one_is_kept() -> None:
    v100, h100 = load_gpu("V100-PCIe-16GB"), load_gpu("H100-SXM")
    assert with_gpu_precision(TrainingSpec(), v100).precision == "fp16"
    assert with_gpu_precision(TrainingSpec(), h100).precision == "bf16"
    asked = TrainingSpec(precision="bf16")
    assert with_gpu_precision(asked, v100).precision == "bf16"  # asked for: refused later, not swapped


def test_grouped_gemm_and_kernel_libraries_need_the_gpu() -> None:
    model = load_model("tiny-moe")
    training = TrainingSpec(seq_len=1024, global_batch=64, precision="fp16")
    v100 = "V100-PCIe-16GB"
    assert any(
        "grouped_gemm (True) needs compute capability 8.0" in v
        for v in _broken(model, training, 8, v100, ep=8)
    )
    assert not any("grouped_gemm" in v for v in _broken(model, training, 8, v100, ep=8, grouped_gemm=False))
    hybrid = DispatcherSpec(kind="hierarchical", backend="hybridep")
    found = _broken(model, training, 8, "A100-SXM-80GB", ep=8, dispatcher=hybrid)
    assert any("on Hybrid-EP needs compute capability 9.0" in v for v in found)
    found = _broken(
        model,
        training,
        8,
        v100,
        ep=8,
        grouped_gemm=False,
        dispatcher=hybrid.model_copy(update={"backend": "deepep"}),
    )
    assert any("on DeepEP needs NVLink" in v for v in found)
    assert runnable_backends("hierarchical", None, load_gpu("A100-SXM-80GB")) == ("deepep",)
    assert runnable_backends("hierarchical", None, load_gpu("H100-SXM")) == ("deepep", "hybridep")
    assert runnable_backends("hierarchical", None, load_gpu(v100)) == ()


def test_v100_plans_fp16_without_grouped_gemm_or_kernel_libraries() -> None:
    plan = solve(
        load_model("tiny-moe"), TrainingSpec(seq_len=1024, global_batch=64), load_cluster("v100-pcie")
    ).plan
    assert plan.training.precision == "fp16"
    assert plan.parallel.grouped_gemm is False
    assert plan.parallel.dispatcher.backend is None
    flags = emit_megatron(plan, load_model("tiny-moe"))
    assert "--fp16" in flags and "--bf16" not in flags and "--moe-grouped-gemm" not in flags


def test_fp8_on_a100_is_refused_before_any_search() -> None:
    with pytest.raises(SpecError, match=r"precision \(fp8\) needs compute capability 8.9"):
        solve(load_model("mixtral-8x7b"), TrainingSpec(precision="fp8"), load_cluster("dgx-a100"))


def test_the_issues_small_batches_get_full_pipelines_or_no_plan() -> None:
    # moonlight on one DGX H100 node, global batch 4: it returned pp2 vpp8 with one micro-batch.
    training = TrainingSpec(global_batch=4)
    plan = solve(load_model("moonlight-16b-a3b"), training, load_cluster("dgx-h100", 1)).plan
    p = plan.parallel
    m = num_microbatches(plan.training, p)
    assert p.pp == 1 or (m >= p.pp and (p.vpp == 1 or m % p.pp == 0))
    # mixtral on 32 H100, global batch 3: every layout that fits needs a pipeline it cannot fill.
    with pytest.raises(InfeasiblePlanError, match="needs at least pp micro-batches"):
        solve(
            load_model("mixtral-8x7b"),
            TrainingSpec(global_batch=3),
            load_cluster("dgx-h100"),
            SearchOptions(),
        )
