"""FP8 quantisation traffic, host-bound layers and framework overheads, against hand counts."""

from __future__ import annotations

import pytest

from planner.catalog import load_cluster, load_model
from planner.costmodel import BUNDLED_RUNTIME, MEGATRON_CORE_EAGER, estimate, with_framework
from planner.costmodel.compute import (
    fp8_quantized_elements,
    host_us_per_kernel,
    layer_kernels,
    recompute_kernels,
    sustained_cluster,
)
from planner.costmodel.dispatchers import dispatcher
from planner.schema import FrameworkOverheads, ModelSpec, ParallelConfig, TrainingSpec


def _term(result, name: str) -> float:  # type: ignore[no-untyped-def]
    return sum(t.exposed_s for t in result.breakdown if t.name == name)


def test_fp8_quantised_elements_of_a_mixtral_layer_by_hand() -> None:
    m = load_model("mixtral-8x7b")  # H 4096, 32 heads of 128, 8 KV groups, F_e 14336, top-2, SwiGLU
    attention = (4096 + (32 + 16) * 128) + (32 * 128 + 4096)  # QKV in + out, projection in + out
    experts = (2 * 4096 + 2 * 2 * 14336) + (2 * 14336 + 2 * 4096)  # fc1 (gate and up) and fc2, k copies
    assert fp8_quantized_elements(m, moe=True) == attention + experts


def test_fp8_training_pays_for_quantisation_and_bf16_does_not() -> None:
    m, cluster = load_model("mixtral-8x7b"), load_cluster("dgx-h100")
    p = ParallelConfig(tp=2, pp=4, ep=8, sequence_parallel=True)
    fp8 = estimate(m, TrainingSpec(seq_len=4096, global_batch=256, precision="fp8"), p, cluster)
    bf16 = estimate(m, TrainingSpec(seq_len=4096, global_batch=256), p, cluster)
    assert _term(fp8, "fp8_quantize") > 0 and _term(bf16, "fp8_quantize") == 0


def test_layer_kernels_of_a_gqa_moe_layer_by_hand() -> None:
    m = load_model("qwen3-30b-a3b")  # GQA, 128 experts, no shared expert
    attention = 1 + 1 + 2 + 3 + 1 + 1  # norm, QKV, RoPE q/k, fused attention (3), projection, residual
    assert dispatcher("alltoall").router_kernels == 31  # Megatron-LM GB200 guide: "from 72 to 31"
    ffn = 1 + 31 + 3 + 1 + 3 + 0 + 1  # norm, router, dispatch, act, combine, add
    python, looped = layer_kernels(m, True, 31, local_experts=8, tp=1, fp8=False)
    assert (python, looped) == (attention + ffn, 2 * 8)
    python_fp8, looped_fp8 = layer_kernels(m, True, 31, local_experts=8, tp=2, fp8=True)
    assert python_fp8 == python + 2 * 2 + 2  # TP collectives around both blocks, a cast per non-expert GEMM
    assert looped_fp8 == 2 * looped  # a quantisation per expert GEMM input


def test_small_moe_layers_are_host_bound_and_large_dense_ones_are_not() -> None:
    cluster = load_cluster("dgx-h100")
    training = TrainingSpec(seq_len=4096, global_batch=64)
    small = estimate(load_model("qwen3-30b-a3b"), training, ParallelConfig(ep=8), cluster)
    assert _term(small, "host_launch_bound") > 0
    quiet = cluster.model_copy(update={"framework": BUNDLED_RUNTIME, "host_overhead_us": 0.0})
    unbound = estimate(load_model("qwen3-30b-a3b"), training, ParallelConfig(ep=8), quiet)
    assert _term(unbound, "host_launch_bound") == 0 and unbound.step_time_s < small.step_time_s
    llama_70b = ModelSpec(
        num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
        ffn_hidden_size=28672, vocab_size=128256,
    )  # fmt: skip
    dense = estimate(llama_70b, training, ParallelConfig(tp=8, pp=8), load_cluster("dgx-h100", 8))
    assert _term(dense, "host_launch_bound") == 0


def test_host_time_grows_the_step_only_beyond_the_gpu_time() -> None:
    cluster, m = load_cluster("dgx-h100"), load_model("qwen3-30b-a3b")
    training, p = TrainingSpec(seq_len=4096, global_batch=64), ParallelConfig(ep=8)

    def step(host_us: float) -> float:
        framework = FrameworkOverheads(kernel_host_us=host_us, sustained_compute_fraction=1.0, source="test")
        return estimate(m, training, p, cluster.model_copy(update={"framework": framework})).step_time_s

    assert step(0.0) == step(1.0)  # far below the GPU time: hidden
    assert step(400.0) > step(200.0) > step(0.0)


def test_framework_defaults_and_overrides() -> None:
    cluster = load_cluster("dgx-h100")
    assert cluster.framework is None
    assert host_us_per_kernel(cluster) == cluster.host_overhead_us + MEGATRON_CORE_EAGER.kernel_host_us
    scaled = sustained_cluster(cluster).gpu.efficiency
    microbenchmarked = cluster.gpu.efficiency
    assert scaled is not None and microbenchmarked is not None
    fraction = MEGATRON_CORE_EAGER.sustained_compute_fraction
    assert scaled.gemm_fraction_bf16 == pytest.approx(microbenchmarked.gemm_fraction_bf16 * fraction)
    assert scaled.hbm_fraction == microbenchmarked.hbm_fraction  # memory-bound kernels are not scaled
    runtime = with_framework(cluster, BUNDLED_RUNTIME)
    assert sustained_cluster(runtime) is runtime and host_us_per_kernel(runtime) == cluster.host_overhead_us
    own = cluster.model_copy(
        update={"framework": FrameworkOverheads(kernel_host_us=1, sustained_compute_fraction=1, source="x")}
    )
    assert with_framework(own, BUNDLED_RUNTIME) is own  # a profile's own figures win


def test_recompute_relaunches_its_modules_kernels() -> None:
    moonlight = load_model("moonlight-16b-a3b")  # MLA, shared experts
    layer, _ = layer_kernels(moonlight, True, 31, local_experts=8, tp=2, fp8=False)
    assert recompute_kernels(moonlight, True, (), full=True, layer=layer) == layer
    assert recompute_kernels(moonlight, True, ("core_attn",), full=False, layer=layer) == 3
    assert recompute_kernels(moonlight, True, ("layernorm", "moe_act"), full=False, layer=layer) == 2 + 1
    assert (
        recompute_kernels(moonlight, True, ("mla_up_proj", "mlp"), full=False, layer=layer) == 8
    )  # no dense FFN
    gqa = load_model("qwen3-30b-a3b")
    assert recompute_kernels(gqa, True, ("mla_up_proj",), full=False, layer=layer) == 0


def test_fsdp_gathers_each_layer_twice_with_or_without_recompute() -> None:
    m, cluster = load_model("mixtral-8x7b"), load_cluster("dgx-h100", 4)
    training = TrainingSpec(seq_len=4096, global_batch=64)

    def gather_time(recompute: str) -> float:
        p = ParallelConfig(tp=2, ep=8, fsdp=True, sequence_parallel=True, recompute=recompute)  # type: ignore[arg-type]
        result = estimate(m, training, p, cluster)
        return next(t.total_s for t in result.breakdown if t.name == "fsdp_gather_scatter")

    assert gather_time("full") == pytest.approx(gather_time("none"))
