"""FP8 parameter gather and unfused attention (issue 16 items 2 and 4): priced, searched where the
precision allows, emitted or refused."""

from __future__ import annotations

import pytest

from planner.catalog import load_cluster, load_model
from planner.costmodel.estimate import LayerCache, estimate, evaluate, layout_costs
from planner.costmodel.memory import (
    FP8_WEIGHT_CACHE_BYTES,
    MXFP8_SCALE_BYTES,
    memory_coefficients,
    split_chunks,
)
from planner.costmodel.params import attention_params, ffn_params, tp_replicated_attention_params
from planner.emit import emit_torchtitan, megatron_args
from planner.errors import SpecError
from planner.feasibility import check_plan
from planner.schema import ModelSpec, OptimizerConfig, ParallelConfig, TrainingSpec
from planner.search import SearchOptions, solve

FP8 = TrainingSpec(precision="fp8")
LAYOUT = ParallelConfig.for_world(64, tp=2, pp=2, ep=8, etp=1, sequence_parallel=True)
"""mixtral-8x7b on 64 H100: DP 16 and EDP 4, so the parameter all-gathers cross nodes."""


def _gathered(parallel: ParallelConfig, training: TrainingSpec = FP8) -> float:
    est = estimate(load_model("mixtral-8x7b"), training, parallel, load_cluster("dgx-h100").model_copy(
        update={"num_nodes": 8}
    ))  # fmt: skip
    return next(t.total_s for t in est.breakdown if t.name == "dp_param_all_gather")


def test_the_rules_megatron_gives() -> None:
    model, gather = load_model("mixtral-8x7b"), LAYOUT.model_copy(update={"fp8_param_gather": True})
    assert not check_plan(model, FP8, gather, 64)
    said = {str(v) for v in check_plan(model, TrainingSpec(precision="bf16"), gather, 64)}
    assert any("needs FP8 training" in s for s in said), said
    replicated = gather.model_copy(update={"distributed_optimizer": False})
    assert any("distributed optimizer" in str(v) for v in check_plan(model, FP8, replicated, 64))
    offload = OptimizerConfig(precision_aware=True, offload_fraction=0.5)
    offloaded = gather.model_copy(update={"optimizer": offload})
    assert any("CPU offload" in str(v) for v in check_plan(model, FP8, offloaded, 64))


def _gemm_params(model: ModelSpec, p: ParallelConfig) -> float:
    """One MoE layer's GEMM weights on a rank: attention projections over TP, experts over EP x ETP."""
    attention = attention_params(model) - tp_replicated_attention_params(model)
    experts = model.num_experts * ffn_params(model, model.expert_ffn_hidden_size) / (p.ep * p.etp)
    return attention / p.tp + experts


def test_fp8_weights_halve_the_expert_gather_and_drop_te_s_weight_cache() -> None:
    gather = LAYOUT.model_copy(update={"fp8_param_gather": True})
    bf16_bytes, fp8_bytes = _gathered(LAYOUT), _gathered(gather)
    # Experts are all GEMM weights, the dense part keeps its BF16 embedding and output layer.
    assert 0.5 * bf16_bytes < fp8_bytes < 0.6 * bf16_bytes
    model = load_model("mixtral-8x7b")
    gemm = _gemm_params(model, LAYOUT)
    # BF16 parameters under FP8: Transformer Engine caches an FP8 copy (data and transpose) of each GEMM
    # weight; FP8 parameters (2 bytes, as BF16) are what the GEMM reads, so nothing is cached.
    cached = memory_coefficients(model, FP8, LAYOUT).moe_layer_state[0]
    kept = memory_coefficients(model, FP8, gather).moe_layer_state[0]
    assert cached - kept == pytest.approx(FP8_WEIGHT_CACHE_BYTES * gemm)
    assert kept == memory_coefficients(model, TrainingSpec(precision="bf16"), LAYOUT).moe_layer_state[0]
    # MXFP8 gathers BF16: no saving in the gather; its primary weights carry E8M0 scales (sharded as the
    # weights), its cached copy too (whole).
    mx = TrainingSpec(precision="mxfp8")
    assert _gathered(gather, mx) == pytest.approx(_gathered(LAYOUT, mx))
    scales = memory_coefficients(model, mx, gather).moe_layer_state[0] - kept
    assert scales == pytest.approx(MXFP8_SCALE_BYTES * gemm, rel=0.01)
    mx_cached = memory_coefficients(model, mx, LAYOUT).moe_layer_state[0] - kept
    assert mx_cached == pytest.approx((FP8_WEIGHT_CACHE_BYTES + MXFP8_SCALE_BYTES) * gemm)


@pytest.mark.parametrize(
    ("training", "options", "expected"),
    [
        (FP8, SearchOptions(), True),
        (FP8, SearchOptions(fp8_param_gather=False), False),
        (TrainingSpec(precision="bf16"), SearchOptions(), False),
        (FP8, SearchOptions(framework="torchtitan"), False),
    ],
)
def test_solve_sets_it_where_the_precision_allows(
    training: TrainingSpec, options: SearchOptions, expected: bool
) -> None:
    plan = solve(load_model("mixtral-8x7b"), training, load_cluster("dgx-h100"), options).plan
    assert plan.parallel.fp8_param_gather is expected


def test_megatron_writes_it_and_torchtitan_refuses_it() -> None:
    model = load_model("mixtral-8x7b")
    plan = solve(model, FP8, load_cluster("dgx-h100")).plan
    assert "--fp8-param-gather" in megatron_args(plan, model)
    # Everything else torchtitan runs: only the FP8 gather is refused.
    runnable = plan.parallel.model_copy(
        update={
            "a2a_overlap": False,
            "dispatcher": plan.parallel.dispatcher.model_copy(update={"kind": "alltoall", "backend": None}),
        }
    )
    with pytest.raises(SpecError, match="fp8_param_gather"):
        emit_torchtitan(plan.model_copy(update={"parallel": runnable}), model)


def test_a_shared_layer_cache_prices_each_layout_as_alone() -> None:
    """The search's LayerCache keys must hold every field a term reads: the FP8 gather (data-parallel
    terms) and the attention backend (per-layer terms) included."""
    model, cluster = load_model("mixtral-8x7b"), load_cluster("dgx-h100").model_copy(update={"num_nodes": 8})
    variants = [
        LAYOUT,
        LAYOUT.model_copy(update={"fp8_param_gather": True}),
        LAYOUT.model_copy(update={"attention_backend": "unfused"}),
    ]
    shared = LayerCache()
    for p in variants:
        alone = evaluate(layout_costs(model, FP8, p, cluster), split_chunks(model, p))
        together = evaluate(layout_costs(model, FP8, p, cluster, shared), split_chunks(model, p))
        assert together == alone, p


def test_mfu_names_its_peak_and_fp8_runs_report_the_fp8_one() -> None:
    """Issue 17 item 4: an FP8 run's MFU is not shown against the BF16 peak alone."""
    from rich.console import Console

    from planner.present.report import render_estimate

    bf16 = estimate(load_model("mixtral-8x7b"), TrainingSpec(), LAYOUT, load_cluster("dgx-h100").model_copy(
        update={"num_nodes": 8}
    ))  # fmt: skip
    fp8 = estimate(load_model("mixtral-8x7b"), FP8, LAYOUT, load_cluster("dgx-h100").model_copy(
        update={"num_nodes": 8}
    ))  # fmt: skip
    peaks = load_cluster("dgx-h100").gpu.peak_tflops
    assert bf16.mfu_fp8 is None and bf16.mfu_peak == "bf16"
    assert fp8.mfu_fp8 == pytest.approx(fp8.model_tflops_per_gpu / peaks.fp8)
    assert fp8.mfu == pytest.approx(fp8.model_tflops_per_gpu / peaks.bf16)
    console = Console(width=200, record=True)
    console.print(render_estimate(fp8, "estimate"))
    shown = console.export_text()
    assert f"MFU {fp8.mfu_fp8:.1%} |" in shown and "dense FP8 peak" in shown
