"""CUDA graphs as a plan setting (issue 17 item 2): priced, ruled, emitted, refused where they cannot run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from planner.catalog import load_cluster, load_model
from planner.cli import app
from planner.costmodel import estimate
from planner.costmodel.compute import (
    GRAPH_REPLAY_LAUNCHES,
    graphed_host_launches,
    layer_kernels,
    layer_regions,
)
from planner.costmodel.memory import CUDA_GRAPH_BUFFER_BYTES, CUDA_GRAPH_PIPELINED_BUFFER_BYTES
from planner.emit.megatron import megatron_args, megatron_env
from planner.errors import SpecError
from planner.feasibility import check_plan
from planner.frameworks import framework
from planner.schema import (
    ClusterRef,
    ModelRef,
    ModelSpec,
    ParallelConfig,
    Plan,
    PlanProvenance,
    TrainingSpec,
)
from planner.search import SearchOptions, solve

TE_MOE = ("attn", "moe_router", "moe_preprocess")
TRAINING = TrainingSpec(seq_len=4096, global_batch=256)


def _term(result: Any, name: str) -> float:
    return sum(t.exposed_s for t in result.breakdown if t.name == name)


def _qwen(**extra: Any) -> ParallelConfig:
    return ParallelConfig.for_world(32, ep=16, **extra)


def test_the_scopes_keep_one_order_whatever_the_input() -> None:
    assert ParallelConfig(cuda_graphs=("moe_preprocess", "attn", "moe_router", "attn")).cuda_graphs == TE_MOE


def test_regions_add_up_to_the_layer_and_graphs_capture_theirs() -> None:
    m = load_model("deepseek-v3")  # MLA, dense and MoE layers, a shared expert
    for moe in (False, True):
        for tp, fp8 in ((1, False), (4, True)):
            regions, looped = layer_regions(m, moe, 17, 8, tp, fp8)
            assert (sum(regions.values()), looped) == layer_kernels(m, moe, 17, 8, tp, fp8)
    regions, _ = layer_regions(m, True, 17, 8, 1, False)
    captured, replays = graphed_host_launches(regions, TE_MOE)
    assert captured == regions["attn"] + regions["moe_router"] + regions["moe_preprocess"]
    # Two graphs (attention; router with preprocessing), each replayed forward and backward.
    assert replays == 2 * 2 * GRAPH_REPLAY_LAUNCHES
    assert graphed_host_launches(regions, ()) == (0, 0)
    assert graphed_host_launches(regions, ("mlp",)) == (0, 0)  # an MoE layer has no dense FFN


def test_graphs_shorten_a_host_bound_step_and_full_iteration_removes_the_bound() -> None:
    m, cluster = load_model("qwen3-30b-a3b"), load_cluster("dgx-h100")
    eager = estimate(m, TRAINING, _qwen(), cluster)
    graphed = estimate(m, TRAINING, _qwen(cuda_graphs=TE_MOE), cluster)
    attention_only = estimate(m, TRAINING, _qwen(cuda_graphs=("attn",)), cluster)
    whole = estimate(m, TRAINING, _qwen(cuda_graphs=("full_iteration",)), cluster)
    assert _term(eager, "host_launch_bound") > _term(attention_only, "host_launch_bound")
    assert _term(attention_only, "host_launch_bound") > _term(graphed, "host_launch_bound")
    assert _term(whole, "host_launch_bound") == 0.0 < _term(eager, "host_launch_bound")
    assert whole.step_time_s <= graphed.step_time_s < eager.step_time_s


def test_graph_buffers_are_held_and_priced() -> None:
    m, cluster = load_model("qwen3-30b-a3b"), load_cluster("dgx-h100")
    eager = estimate(m, TRAINING, _qwen(), cluster)
    graphed = estimate(m, TRAINING, _qwen(cuda_graphs=TE_MOE), cluster)
    assert eager.memory is not None and graphed.memory is not None
    assert eager.memory.cuda_graph_buffers == 0.0
    assert graphed.memory.cuda_graph_buffers == CUDA_GRAPH_BUFFER_BYTES
    assert graphed.peak_memory_bytes == pytest.approx(eager.peak_memory_bytes + CUDA_GRAPH_BUFFER_BYTES)
    piped = ParallelConfig.for_world(32, pp=2, ep=16, cuda_graphs=TE_MOE)
    memory = estimate(m, TRAINING, piped, cluster).memory
    assert memory is not None and memory.cuda_graph_buffers == CUDA_GRAPH_PIPELINED_BUFFER_BYTES


def _graph_violations(
    model: ModelSpec, parallel: ParallelConfig, training: TrainingSpec = TRAINING
) -> list[str]:
    return [v.rule for v in check_plan(model, training, parallel, 32) if v.field == "cuda_graphs"]


@pytest.mark.parametrize(
    ("scopes", "extra", "training", "rule"),
    [
        (("attn", "full_iteration"), {}, TRAINING, "full_iteration stands alone"),
        (("attn", "moe_preprocess"), {}, TRAINING, "moe_preprocess is captured only with moe_router"),
        (("attn", "mlp"), {}, TRAINING, "mlp captures dense layers' FFNs"),
        (TE_MOE, {"recompute": "full"}, TRAINING, "full recompute is only supported"),
        (TE_MOE, {"recompute": "selective", "recompute_modules": ("moe",)}, TRAINING, "recomputing moe"),
        (
            TE_MOE,
            {},
            TrainingSpec(seq_len=4096, global_batch=256, routing="capacity", capacity_factor=1.0),
            "moe_preprocess cannot capture",
        ),
        (("full_iteration",), {}, TRAINING, "a full_iteration graph needs MoE layers of fixed shapes"),
    ],
)
def test_megatron_cores_graph_rules(
    scopes: tuple[str, ...], extra: dict[str, Any], training: TrainingSpec, rule: str
) -> None:
    m = load_model("qwen3-30b-a3b")  # MoE in every layer
    broken = _graph_violations(m, _qwen(cuda_graphs=scopes, **extra), training)
    assert any(text.startswith(rule) for text in broken), broken


def test_valid_scopes_break_no_rule() -> None:
    assert _graph_violations(load_model("qwen3-30b-a3b"), _qwen(cuda_graphs=TE_MOE)) == []
    dense_and_moe = ParallelConfig.for_world(32, ep=16, cuda_graphs=("attn", "mlp", "moe_router"))
    assert _graph_violations(load_model("deepseek-v3"), dense_and_moe) == []


def _plan(parallel: ParallelConfig, model: str = "qwen3-30b-a3b") -> Plan:
    return Plan(
        model=ModelRef(name=model, source="catalog"),
        cluster=ClusterRef(name="dgx-h100", source="bundled"),
        num_nodes=4,
        num_gpus_per_node=8,
        num_gpus=32,
        training=TRAINING,
        parallel=parallel,
        provenance=PlanProvenance(moeplan_version="0.1.0"),
    )


def test_megatron_flags_follow_the_release() -> None:
    plan, model = _plan(_qwen(cuda_graphs=TE_MOE)), load_model("qwen3-30b-a3b")
    for version, scope_flag in (("0.16", "--cuda-graph-scope"), ("0.18", "--cuda-graph-modules")):
        args = " ".join(megatron_args(plan, model, version))
        assert "--cuda-graph-impl transformer_engine" in args
        assert f"{scope_flag} attn moe_router moe_preprocess" in args
    with pytest.raises(SpecError, match="needs megatron_version 0.16"):
        megatron_args(plan, model, "0.15")
    # Megatron-LM refuses TE graphs under expandable segments unless NCCL leaves the buffers unregistered.
    assert megatron_env(plan)["NCCL_GRAPH_REGISTER"] == "0"
    assert "NCCL_GRAPH_REGISTER" not in megatron_env(_plan(_qwen()))
    assert "cuda-graph" not in " ".join(megatron_args(_plan(_qwen()), model))
    with pytest.raises(SpecError, match="moe_preprocess is captured only with moe_router"):
        megatron_args(_plan(_qwen(cuda_graphs=("moe_preprocess",))), model)


def test_full_iteration_flags_for_a_dense_model() -> None:
    dense = ModelSpec(
        num_layers=4, hidden_size=1024, num_attention_heads=8, num_query_groups=8, ffn_hidden_size=4096,
        vocab_size=32000,
    )  # fmt: skip
    plan = _plan(ParallelConfig.for_world(32, cuda_graphs=("full_iteration",)), model="tiny-moe")
    args = " ".join(megatron_args(plan, dense, "0.16"))
    assert (
        "--cuda-graph-impl local --cuda-graph-scope full_iteration --no-check-for-nan-in-loss-and-grad"
        in args
    )
    assert "--cuda-graph-impl full_iteration --no-check-for-nan-in-loss-and-grad" in " ".join(
        megatron_args(plan, dense, "0.18")
    )
    assert "NCCL_GRAPH_REGISTER" not in megatron_env(plan)


def test_torchtitan_and_the_runtime_refuse_graphs() -> None:
    m, p = load_model("qwen3-30b-a3b"), _qwen(cuda_graphs=TE_MOE)
    assert any(v.field == "cuda_graphs" for v in framework("torchtitan").rules(m, TRAINING, p))
    assert any(v.field == "cuda_graphs" for v in framework("moeplan").rules(m, TRAINING, p))
    assert not any(v.field == "cuda_graphs" for v in framework("megatron").rules(m, TRAINING, p))


def test_the_search_offers_graphs_and_keeps_them_where_faster() -> None:
    m, cluster = load_model("qwen3-30b-a3b"), load_cluster("dgx-h100")
    training = TrainingSpec(seq_len=4096, global_batch=256, precision="fp8")
    eager = solve(m, training, cluster, SearchOptions()).plan
    offered = solve(m, training, cluster, SearchOptions(cuda_graphs=("auto",))).plan
    assert eager.parallel.cuda_graphs == ()
    assert offered.parallel.cuda_graphs == TE_MOE
    assert offered.estimate is not None and eager.estimate is not None
    assert offered.estimate.step_time_s < eager.estimate.step_time_s
    # Priced again from the plan alone, the same figures.
    again = estimate(m, offered.training, offered.parallel, cluster)
    assert again.step_time_s == pytest.approx(offered.estimate.step_time_s)
    assert again.peak_memory_bytes == pytest.approx(offered.estimate.peak_memory_bytes)


def test_solve_refuses_an_unknown_scope(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["solve", "--model", "tiny-moe", "--cuda-graphs", "attn,moe"])
    assert result.exit_code == 2
    assert "--cuda-graphs (attn,moe) must be auto or comma-separated CUDA graph scopes" in " ".join(
        result.output.split()
    )
    out = tmp_path / "plan.json"
    ok = runner.invoke(app, ["solve", "--model", "tiny-moe", "--cuda-graphs", "auto", "-o", str(out)])
    assert ok.exit_code == 0, ok.output
    assert isinstance(json.loads(out.read_text())["parallel"]["cuda_graphs"], list)
