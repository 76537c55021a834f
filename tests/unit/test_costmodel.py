"""Cost-model formulas against hand calculations, and invariants of the composed estimate."""

from __future__ import annotations

import pytest

from planner.catalog import load_cluster, load_gpu, load_model, with_nodes
from planner.costmodel import count_params, estimate
from planner.costmodel.comm import link_time, p2p_time, ring_bytes, ring_time
from planner.costmodel.compute import attention_time, gemm_time, memory_time
from planner.costmodel.flops import (
    layer_flops,
    model_flops_per_token,
    recompute_flops,
    recompute_flops_per_token,
)
from planner.costmodel.geometry import GroupGeometry, group_geometry
from planner.costmodel.memory import estimate_memory
from planner.costmodel.routing import expected_max_normal, routing_imbalance
from planner.schema import DispatcherSpec, MeshAxis, ModelSpec, ParallelConfig, TrainingSpec


@pytest.mark.parametrize(
    ("name", "mtp", "expected"),
    # ../shared/validation/published.yaml notes and the issue: FLOPs per token at sequence 4096
    [
        ("deepseek-v3", 1, 2.6e11),
        ("deepseek-v3", 0, 2.5e11),
        ("qwen3-235b-a22b", 0, 1.48e11),
        ("qwen3-30b-a3b", 0, 2.30e10),
    ],
)
def test_flops_per_token_match_published(name: str, mtp: int, expected: float) -> None:
    model = load_model(name).model_copy(update={"mtp_num_layers": mtp})
    assert model_flops_per_token(model, 4096) == pytest.approx(expected, rel=0.01)


def test_mixtral_layer_flops_by_hand() -> None:
    lf = layer_flops(load_model("mixtral-8x7b"), 4096, moe=True)
    # attention matrices 4096*4096*2 + 2*4096*1024 = 41,943,040 params -> 2x FLOPs
    assert lf.attn_proj == 2 * 41_943_040
    # causal core attention: 2 * s * a * (d + d) / 2 = 2 * 4096 * 32 * 256 / 2
    assert lf.core_attn == 2 * 4096 * 32 * 256 / 2
    assert lf.routed_experts == 2 * 2 * 3 * 4096 * 14336 and lf.router == 2 * 4096 * 8


def test_recompute_flops() -> None:
    lf = layer_flops(load_model("deepseek-v3"), 4096, moe=True)
    assert recompute_flops(lf, ParallelConfig(recompute="full")) == lf.total
    assert recompute_flops(lf, ParallelConfig(recompute="selective")) == lf.core_attn  # Megatron's default
    only_up = ParallelConfig(recompute="selective", recompute_modules=("mla_up_proj",))
    assert recompute_flops(lf, only_up) == lf.attn_up_proj > 0
    assert recompute_flops_per_token(load_model("deepseek-v3"), 4096, ParallelConfig()) == 0


def test_ring_and_all_to_all_times_by_hand() -> None:
    h100 = load_cluster("dgx-h100")
    node = GroupGeometry(size=8, num_nodes=1, ranks_per_node=8)
    # all_gather of 1 GB over 8 ranks at 370 GB/s busbw: 10 us + 1e9 * 7/8 / 370e9
    assert ring_time(h100, "all_gather", 1e9, node) == pytest.approx(10e-6 + 1e9 * 7 / 8 / 370e9)
    assert ring_time(h100, "all_reduce", 1e9, node) == pytest.approx(10e-6 + 1e9 * 2 * 7 / 8 / 480e9)
    # 16 ranks, 8 per node: ring busbw = min(370, 8 * 48) = 370, latency of the NIC (47 us)
    two_nodes = GroupGeometry(size=16, num_nodes=2, ranks_per_node=8)
    assert ring_time(h100, "all_gather", 1e9, two_nodes) == pytest.approx(47e-6 + 1e9 * 15 / 16 / 370e9)
    # one rank per node: the NIC alone
    strided = GroupGeometry(size=4, num_nodes=4, ranks_per_node=1)
    assert ring_time(h100, "reduce_scatter", 1e9, strided) == pytest.approx(47e-6 + 1e9 * 3 / 4 / 48e9)
    # all-to-all of 1 GB over 16 ranks: 7/16 on NVLink, 8/16 on the NIC -> the NIC bounds it
    assert link_time(h100, "all_to_all", 1e9 * 7 / 16, 1e9 * 8 / 16) == pytest.approx(
        47e-6 + 1e9 * 8 / 16 / 48e9
    )
    assert p2p_time(h100, 1e6, True) == pytest.approx(47e-6 + 1e6 / 48e9)


def test_kernel_times_by_hand() -> None:
    h100 = load_gpu("H100-SXM")
    assert gemm_time(1e12, 1, h100, "bf16") == pytest.approx(6.4e-6 + 1e12 / (0.784 * 989.5e12))
    assert gemm_time(1e12, 2, h100, "fp8") == pytest.approx(12.8e-6 + 1e12 / (0.652 * 1979e12))
    forward, backward = attention_time(1e12, h100)
    assert forward == pytest.approx(1e12 / (0.523 * 989.5e12))
    assert backward == pytest.approx(2.5e12 / (0.504 * 989.5e12))
    assert memory_time(1e9, h100) == pytest.approx(1e9 / (3350e9 * 0.866))


def test_group_geometry_follows_megatron_order() -> None:
    p = ParallelConfig.for_world(64, tp=2, pp=2, ep=8)  # 8 GPUs per node
    assert group_geometry(p, MeshAxis.TP, 8) == GroupGeometry(2, 1, 2)
    assert group_geometry(p, MeshAxis.DP, 8) == GroupGeometry(16, 4, 4)  # stride 2 over ranks 0..31
    assert group_geometry(p, MeshAxis.EP, 8) == GroupGeometry(8, 1, 8)
    assert group_geometry(p, MeshAxis.PP, 8) == GroupGeometry(2, 2, 1)


def test_model_state_memory_by_hand() -> None:
    # Megatron docs: 6 + 12/d bytes per parameter with the distributed optimizer
    model = load_model("mixtral-8x7b").model_copy(update={"num_experts": None, "moe_router_topk": None})
    p = ParallelConfig.for_world(8)  # dp = 8
    memory = estimate_memory(model, TrainingSpec(global_batch=8), p)
    params = (memory.weights) / 2
    assert memory.gradients == pytest.approx(4 * params)
    assert memory.optimizer == pytest.approx(12 * params / 8)


def test_routing_imbalance_statistics() -> None:
    assert routing_imbalance(1e6, 1) == 1.0
    # 10,000 copies per rank over 32 ranks: 1 + sqrt(1e4 * 31/32) * M(32) / 1e4, M(32) = 2.07
    assert routing_imbalance(1e4, 32) == pytest.approx(
        1 + (1e4 * 31 / 32) ** 0.5 * expected_max_normal(32) / 1e4
    )
    assert expected_max_normal(32) == pytest.approx(2.07, abs=0.01)


def _dsv3(**changes: object):  # type: ignore[no-untyped-def]
    model = load_model("deepseek-v3")
    cluster = load_cluster("h800-dsv3", num_nodes=8)
    parallel = ParallelConfig.for_world(64, ep=64, dispatcher=DispatcherSpec(kind="hierarchical"), **changes)
    return model, TrainingSpec(global_batch=64, precision="fp8"), parallel, cluster


def test_estimate_has_every_term_and_consistent_totals() -> None:
    model, training, parallel, cluster = _dsv3(pp=1)
    result = estimate(model, training, parallel, cluster)
    names = {t.name for t in result.breakdown}
    assert {
        "gemm",
        "attention",
        "elementwise",
        "ep_dispatch_combine",
        "pipeline_bubble",
        "optimizer_step",
    } <= names
    assert result.step_time_s == pytest.approx(sum(t.exposed_s for t in result.breakdown))
    assert all(t.exposed_s <= t.total_s + 1e-12 for t in result.breakdown)
    tokens = training.global_batch * training.seq_len
    assert result.tokens_per_s_per_gpu == pytest.approx(tokens / result.step_time_s / 64)
    assert set(result.bytes_per_link_class) == {"inter_node", "intra_node"}


def test_hierarchical_moves_fewer_inter_node_bytes_than_flat() -> None:
    model, training, parallel, cluster = _dsv3()
    hier = estimate(model, training, parallel, cluster)
    flat = estimate(model, training, parallel.model_copy(update={"dispatcher": DispatcherSpec()}), cluster)
    assert flat.bytes_per_link_class["inter_node"] > 2 * hier.bytes_per_link_class["inter_node"]
    assert flat.step_time_s > hier.step_time_s


def test_faster_links_never_slow_a_plan_down() -> None:
    model, training, parallel, cluster = _dsv3()
    base = estimate(model, training, parallel, cluster).step_time_s
    data = cluster.model_dump()
    for fit in data["links"]["inter_node"]["collectives"].values():
        fit["bandwidth_gbps"] *= 2
    faster = type(cluster).model_validate(data)
    assert estimate(model, training, parallel, faster).step_time_s < base


def test_overlap_hides_expert_parallel_communication() -> None:
    model, training, parallel, cluster = _dsv3()
    training = training.model_copy(update={"global_batch": 512})  # 8 micro-batches: 7 of 8 passes paired
    plain = estimate(model, training, parallel, cluster)
    layout = parallel.model_copy(update={"a2a_overlap": True})
    overlapped = estimate(model, training, layout, cluster)
    ep = {t.name: t for t in overlapped.breakdown}["ep_dispatch_combine"]
    assert ep.exposed_s < ep.total_s and overlapped.step_time_s < plain.step_time_s
    # One micro-batch has no partner: its communication shows whole, and no SMs are lent to it.
    single = estimate(model, training.model_copy(update={"global_batch": 64}), layout, cluster)
    terms = {t.name: t for t in single.breakdown}
    assert terms["ep_dispatch_combine"].exposed_s == pytest.approx(terms["ep_dispatch_combine"].total_s)
    assert terms["ep_overlap_sm_cost"].exposed_s == 0.0


def test_condensation_cuts_traffic_and_expert_compute() -> None:
    model, training, parallel, cluster = _dsv3()
    base = estimate(model, training, parallel, cluster)
    condensed = parallel.model_copy(
        update={"dispatcher": DispatcherSpec(kind="hierarchical", condense_fraction=0.5)}
    )
    half = estimate(model, training, condensed, cluster)
    assert half.bytes_per_link_class["inter_node"] == pytest.approx(
        base.bytes_per_link_class["inter_node"] / 2
    )
    gemm = {t.name: t.total_s for t in base.breakdown}["gemm"]
    assert {t.name: t.total_s for t in half.breakdown}["gemm"] < gemm


def test_more_expert_parallelism_means_fewer_expert_bytes_per_gpu() -> None:
    model, training = load_model("mixtral-8x7b"), TrainingSpec(global_batch=64)
    small = estimate_memory(model, training, ParallelConfig.for_world(16, ep=2))
    large = estimate_memory(model, training, ParallelConfig.for_world(16, ep=8))
    assert large.weights < small.weights and large.gradients < small.gradients
    # the distributed optimizer shards expert states over edp = world/ep: per GPU they are routed/world either way
    assert large.optimizer == pytest.approx(small.optimizer)


def test_recompute_lowers_activation_memory_and_adds_time() -> None:
    model, training, parallel, cluster = _dsv3(pp=1)
    none = estimate_memory(model, training, parallel)
    full = estimate_memory(model, training, parallel.model_copy(update={"recompute": "full"}))
    assert full.activations < none.activations / 5
    slower = estimate(model, training, parallel.model_copy(update={"recompute": "full"}), cluster)
    assert slower.step_time_s > estimate(model, training, parallel, cluster).step_time_s


def test_interleaving_shrinks_the_bubble() -> None:
    model, cluster = load_model("mixtral-8x7b"), load_cluster("dgx-h100")
    training = TrainingSpec(global_batch=64)
    plain = estimate(model, training, ParallelConfig.for_world(32, pp=4, ep=8), cluster)
    inter = estimate(model, training, ParallelConfig.for_world(32, pp=4, vpp=2, ep=8), cluster)
    bubble = {t.name: t.exposed_s for t in plain.breakdown}["pipeline_bubble"]
    assert {t.name: t.exposed_s for t in inter.breakdown}["pipeline_bubble"] < bubble


def test_deterministic() -> None:
    args = _dsv3()
    assert estimate(*args).model_dump_json() == estimate(*args).model_dump_json()


def test_ring_bytes_by_hand() -> None:
    # 8 ranks in one node: all_reduce sends 2 * 7/8 of the buffer, all on NVLink.
    assert ring_bytes("all_reduce", 800.0, GroupGeometry(8, 1, 8)) == {"intra_node": 1400.0}
    # 4 ranks on 2 nodes: 2 of the ring's 4 hops leave the node, so half of each rank's bytes do.
    assert ring_bytes("reduce_scatter", 400.0, GroupGeometry(4, 2, 2)) == {
        "inter_node": 150.0,
        "intra_node": 150.0,
    }
    # One rank per node: every hop crosses.
    assert ring_bytes("all_gather", 400.0, GroupGeometry(4, 4, 1)) == {"inter_node": 300.0}
    assert ring_bytes("all_gather", 400.0, GroupGeometry(1, 1, 1)) == {}


def test_gradient_bytes_are_the_rings_of_the_local_parameters() -> None:
    model, training = load_model("mixtral-8x7b"), TrainingSpec(global_batch=64)
    cluster = with_nodes(load_cluster("dgx-h100"), 2)
    # dp 16 over 2 nodes (8 per node), no expert parallelism: dense and expert gradients share the DP ring.
    parallel = ParallelConfig.for_world(16, distributed_optimizer=False)
    result = estimate(model, training, parallel, cluster)
    params = count_params(model).total
    sent = 4 * params * 2 * 15 / 16  # fp32 gradients, all_reduce ring factor 2
    assert sum(result.gradient_bytes_per_link_class.values()) == pytest.approx(sent, rel=1e-9)
    assert result.gradient_bytes_per_link_class["inter_node"] == pytest.approx(sent * 2 / 16, rel=1e-9)


def test_etp_bytes_are_priced() -> None:
    # ETP all-gathers the routed rows and reduce-scatters the partial outputs, forward and backward:
    # rings over a 2-rank group inside the node send (n-1)/n = 1/2 of the gathered buffer each. The EP
    # groups stay inside the node either way, so the dispatch bytes do not change.
    model, cluster = load_model("mixtral-8x7b"), load_cluster("dgx-h100")
    training = TrainingSpec(seq_len=4096, global_batch=64, routing="balanced")
    base = estimate(model, training, ParallelConfig.for_world(8, tp=2, ep=4, sequence_parallel=True), cluster)
    etp = ParallelConfig.for_world(8, tp=2, ep=4, etp=2, sequence_parallel=True)
    split = estimate(model, training, etp, cluster)
    micro_batches = 64 // 4  # dp = 8 / tp
    gathered = 4096 / 2 * 2 * 4096 * 2 * 2  # tokens per rank x top-k x H x bf16 bytes x etp
    expected = 32 * micro_batches * 2 * 2 * gathered / 2  # layers x two collectives, forward and backward
    extra = split.bytes_per_link_class["intra_node"] - base.bytes_per_link_class["intra_node"]
    assert extra == pytest.approx(expected)


def test_an_moe_layer_keeps_its_expert_inputs_and_activations_but_not_its_outputs() -> None:
    # Mixtral's MoE layer per token at TP1 without recompute, written out by hand: residuals and the two
    # norm outputs (4H x 2 B), Q, K, V and the attention output (2 B each), FP32 router scores (4E), the
    # k permuted inputs (kH) and the k fc1 outputs (2kF) and activation outputs (kF), BF16. Megatron-Core
    # weighs tokens inside the activation and un-permutes without probabilities, so the k expert outputs
    # (kH) are not kept (the term this model had until issue 16).
    model = load_model("mixtral-8x7b")
    h, f, k, e = (
        model.hidden_size,
        model.expert_ffn_hidden_size,
        model.moe_router_topk or 1,
        model.num_experts or 0,
    )
    d, heads, groups = model.head_dim, model.num_attention_heads, model.query_groups
    attention = (heads * d + 2 * groups * d + heads * d) * 2
    per_token = 4 * h * 2 + attention + 4 * e + (k * h + 2 * k * f + k * f) * 2
    training, parallel = TrainingSpec(seq_len=4096), ParallelConfig.for_world(8, ep=8, micro_batch=1)
    tokens = training.seq_len
    layers = estimate_memory(model, training, parallel).activations
    assert layers == pytest.approx(per_token * tokens * model.num_layers, rel=1e-9)


def _dense() -> ModelSpec:
    """Llama 3 8B's dimensions (SwiGLU, GQA), a dense model."""
    return ModelSpec(
        name="dense-8b", num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
        ffn_hidden_size=14336, vocab_size=128256,
    )  # fmt: skip


def test_without_sequence_parallelism_every_tp_rank_runs_the_norms_and_residuals() -> None:
    """Korthikanti et al. 2022 §4.2.2 (issue 17 item 3): without SP the norms and residual adds run on the
    whole sequence on every TP rank; the rest of the element-wise work is split by heads or FFN columns."""
    model, cluster = _dense(), load_cluster("dgx-h100")
    training = TrainingSpec(seq_len=4096, global_batch=64)
    sp = ParallelConfig.for_world(8, tp=8, sequence_parallel=True)
    terms = {
        on: {t.name: t.total_s for t in estimate(model, training, sp.model_copy(update={"sequence_parallel": on}),
                                                  cluster).breakdown}
        for on in (True, False)
    }  # fmt: skip
    h, f = model.hidden_size, model.ffn_hidden_size
    q, k = model.num_attention_heads * model.head_dim, model.query_groups * model.head_dim
    split = 2.0 * (q + k) + 3.0 * f
    hidden = 10.0 * h
    ratio = (8 * hidden + split) / (hidden + split)
    assert terms[False]["elementwise"] == pytest.approx(terms[True]["elementwise"] * ratio, rel=1e-9)


def test_full_recompute_reruns_the_forward_tp_collectives() -> None:
    model, cluster = _dense(), load_cluster("dgx-h100")
    layout = ParallelConfig.for_world(8, tp=8, sequence_parallel=True)
    training = TrainingSpec(seq_len=4096, global_batch=64)
    none = {t.name: t.total_s for t in estimate(model, training, layout, cluster).breakdown}
    full = estimate(model, training, layout.model_copy(update={"recompute": "full"}), cluster)
    terms = {t.name: t.total_s for t in full.breakdown}
    assert "tp_comm_recompute" not in none
    # The forward's all-gather and reduce-scatter of each TP block again; the backward's three (the output
    # gradient's all-gather, the input gradient's reduce-scatter, the input's re-gather) are not rerun.
    geo = group_geometry(layout, MeshAxis.TP, cluster.num_gpus_per_node)
    full_bytes = training.seq_len * model.hidden_size * 2
    ag, rs = (ring_time(cluster, kind, full_bytes, geo) for kind in ("all_gather", "reduce_scatter"))
    assert terms["tp_comm_recompute"] == pytest.approx(none["tp_comm"] * (ag + rs) / (3 * ag + 2 * rs))
    # Without sequence parallelism: one all-reduce a block forward, one backward.
    plain = layout.model_copy(update={"sequence_parallel": False})
    none = {t.name: t.total_s for t in estimate(model, training, plain, cluster).breakdown}
    full = estimate(model, training, plain.model_copy(update={"recompute": "full"}), cluster)
    terms = {t.name: t.total_s for t in full.breakdown}
    assert terms["tp_comm_recompute"] == pytest.approx(none["tp_comm"] / 2)
