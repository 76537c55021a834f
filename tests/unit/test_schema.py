"""Every single-object rule of the schema, each with an input that breaks it."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from planner.schema import (
    AlphaBetaFit,
    ClusterProfile,
    ClusterRef,
    DispatcherSpec,
    GpuSpec,
    LinkClass,
    ModelRef,
    ModelSpec,
    ParallelConfig,
    PeakTflops,
    Plan,
    PlanProvenance,
    TrainingSpec,
)

MODEL: dict[str, Any] = {
    "num_layers": 4,
    "hidden_size": 64,
    "num_attention_heads": 8,
    "num_query_groups": 4,
    "ffn_hidden_size": 128,
    "num_experts": 8,
    "moe_router_topk": 2,
    "vocab_size": 100,
}


def model(**changes: Any) -> ModelSpec:
    return ModelSpec.model_validate({**MODEL, **changes})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_query_groups": 3}, "num_query_groups .3. must divide num_attention_heads .8."),
        ({"hidden_size": 60}, "hidden_size .60. must be divisible by num_attention_heads"),
        ({"attention": "mla"}, "attention is 'mla', so the mla dimensions must be given"),
        ({"first_k_dense_layers": 4}, "first_k_dense_layers .4. must be below num_layers"),
        ({"moe_router_topk": None}, "moe_router_topk must be given"),
        ({"moe_router_topk": 9}, r"moe_router_topk \(9\) must be at most num_experts \(8\)"),
        ({"moe_router_num_groups": 4}, "must be given together"),
        ({"moe_router_num_groups": 3, "moe_router_group_topk": 1}, "must divide num_experts"),
        ({"moe_router_num_groups": 4, "moe_router_group_topk": 5}, "must be at most moe_router_num_groups"),
        (
            {"moe_router_num_groups": 4, "moe_router_group_topk": 1, "moe_router_topk": 3},
            "group_topk x experts",
        ),
        ({"num_layers": 0}, "greater than 0"),
        ({"attention": "linear"}, "'gqa' or 'mla'"),
        ({"num_expert": 8}, "Extra inputs are not permitted"),
        ({"shared_expert_ffn_hidden_size": -1}, "greater than or equal to 0"),
        ({"mla": {"kv_lora_rank": 4}}, "Field required"),
    ],
)
def test_model_rules(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        model(**changes)


def test_model_normalises_validation_format_nulls() -> None:
    spec = model(num_experts=0, moe_router_topk=None, shared_expert_ffn_hidden_size=None, mtp_num_layers=None)
    assert spec.num_experts is None and not spec.is_moe
    assert spec.shared_expert_ffn_hidden_size == 0 and spec.mtp_num_layers == 0


def test_model_defaults_resolve() -> None:
    spec = model(num_query_groups=None, moe_ffn_hidden_size=None, first_k_dense_layers=1)
    assert spec.query_groups == 8 and spec.head_dim == 8 and spec.expert_ffn_hidden_size == 128
    assert spec.num_moe_layers == 3 and spec.num_dense_layers == 1


def test_an_unused_ffn_width_may_be_unstated() -> None:
    # An MoE model without dense layers never reads it: Megatron's default (validate_args: 8H/3 rounded
    # down to a multiple of 64 with SwiGLU, 4H without) stands in. A model that reads it must state it.
    base = {"num_layers": 2, "hidden_size": 4096, "num_attention_heads": 32, "vocab_size": 1000}
    experts = {**base, "num_experts": 8, "moe_router_topk": 2, "moe_ffn_hidden_size": 1408}
    spec = ModelSpec.model_validate({**experts, "ffn_hidden_size": None})
    assert spec.ffn_hidden_size == 10880 and spec.expert_ffn_hidden_size == 1408
    assert ModelSpec.model_validate({**experts, "gated_linear_unit": False}).ffn_hidden_size == 16384
    for reads_it in (base, {**experts, "first_k_dense_layers": 1}, {**experts, "moe_ffn_hidden_size": None}):
        with pytest.raises(ValidationError, match="ffn_hidden_size is not given"):
            ModelSpec.model_validate(reads_it)


def test_specs_are_frozen() -> None:
    spec = model()
    with pytest.raises(ValidationError, match="frozen"):
        spec.num_layers = 5  # type: ignore[misc]


def test_peak_needs_half_precision() -> None:
    with pytest.raises(ValidationError, match="needs a bf16 or an fp16 figure"):
        PeakTflops(fp8=100)


def test_gpu_rejects_nonpositive_memory() -> None:
    with pytest.raises(ValidationError, match="hbm_gib"):
        GpuSpec(peak_tflops=PeakTflops(bf16=1), hbm_gib=0, hbm_gbps=1, source="x")


def _fit() -> dict[str, Any]:
    return {"latency_us": 1, "bandwidth_gbps": 10, "source": "x"}


def _link(
    kinds: tuple[str, ...] = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv"),
) -> dict[str, Any]:
    return {"medium": "m", "nominal_gbps": 10, "source": "x", "collectives": {k: _fit() for k in kinds}}


def _cluster(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "c",
        "num_nodes": 2,
        "num_gpus_per_node": 2,
        "gpu": {"peak_tflops": {"bf16": 1}, "hbm_gib": 1, "hbm_gbps": 1, "source": "x"},
        "links": {"intra_node": _link(), "inter_node": _link()},
        "provenance": {"kind": "published", "source": "x"},
    }
    return {**base, **changes}


def test_link_needs_every_collective() -> None:
    with pytest.raises(ValidationError, match="missing send_recv"):
        LinkClass.model_validate(_link(("all_reduce", "all_gather", "reduce_scatter", "all_to_all")))


def test_fit_rejects_negative_latency() -> None:
    with pytest.raises(ValidationError, match="latency_us"):
        AlphaBetaFit(latency_us=-1, bandwidth_gbps=1, source="x")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"links": {"inter_node": _link()}}, "links must include intra_node"),
        ({"links": {"intra_node": _link()}}, "so links must include inter_node"),
        ({"links": {"intra_node": _link(), "nvlink": _link()}}, "intra_node', 'inter_node' or 'pcie'"),
        ({"nic_affinity": [{"gpu": 2, "nic": "mlx5_0", "path": "PIX"}]}, "is not below num_gpus_per_node"),
        ({"nic_affinity": [{"gpu": 0, "nic": "mlx5_0", "path": "NV4"}]}, "PIX"),
        ({"provenance": {"kind": "guess", "source": "x"}}, "'published', 'probe' or 'user'"),
        ({"num_nodes": 0}, "greater than 0"),
    ],
)
def test_cluster_rules(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ClusterProfile.model_validate(_cluster(**changes))


def test_single_node_cluster_needs_no_inter_node_link() -> None:
    profile = ClusterProfile.model_validate(_cluster(num_nodes=1, links={"intra_node": _link()}))
    assert profile.world_size == 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"routing": "capacity"}, "capacity_factor must be given"),
        ({"capacity_factor": 1.25}, "only used with routing 'capacity'"),
        ({"precision": "fp4"}, "'bf16', 'fp16', 'fp8' or 'mxfp8'"),
        ({"seq_len": 0}, "greater than 0"),
    ],
)
def test_training_rules(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TrainingSpec.model_validate(changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "alltoall", "backend": "deepep"}, "only used by the hierarchical dispatcher"),
        ({"kind": "alltoall", "num_chunks": 4}, "only used by the monta dispatcher"),
        ({"condense_fraction": 1.0}, "less than 1"),
        ({"condense_fraction": -0.1}, "greater than or equal to 0"),
        ({"kind": "deepep"}, "'allgather', 'alltoall', 'hierarchical' or 'monta'"),
    ],
)
def test_dispatcher_rules(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DispatcherSpec.model_validate(changes)


def test_recompute_modules_need_selective() -> None:
    with pytest.raises(ValidationError, match="only used with recompute 'selective'"):
        ParallelConfig(recompute="full", recompute_modules=("core_attn",))
    with pytest.raises(ValidationError, match="recompute_modules"):
        ParallelConfig.model_validate({"recompute": "selective", "recompute_modules": ["attention"]})
    assert ParallelConfig(recompute="selective").effective_recompute_modules == ("core_attn",)


def test_for_world_derives_data_parallel() -> None:
    config = ParallelConfig.for_world(16, tp=2, pp=2, ep=4)
    assert (config.dp, config.edp) == (4, 2)


def test_plan_round_trips_and_pins_schema_version() -> None:
    plan = Plan(
        model=ModelRef(name="m", source="file", path="m.yaml", sha256="0" * 64),
        cluster=ClusterRef(name="c", source="bundled"),
        num_nodes=1,
        num_gpus_per_node=8,
        num_gpus=8,
        training=TrainingSpec(),
        parallel=ParallelConfig.for_world(
            8, tp=2, ep=4, dispatcher=DispatcherSpec(kind="monta", num_chunks=4)
        ),
        provenance=PlanProvenance(moeplan_version="0"),
    )
    assert Plan.model_validate_json(plan.model_dump_json()) == plan
    with pytest.raises(ValidationError, match="schema_version"):
        Plan.model_validate({**plan.model_dump(), "schema_version": 4})


@pytest.mark.parametrize(
    ("ref", "match"),
    [
        ({"name": "c", "source": "file"}, "needs both path and sha256"),
        ({"name": "c", "source": "probe", "path": "p.yaml"}, "needs both path and sha256"),
        ({"name": "c", "source": "bundled", "path": "c.yaml"}, "only given for a file"),
    ],
)
def test_a_cluster_file_is_recorded_with_its_hash(ref: dict[str, str], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        ClusterRef.model_validate(ref)


def test_published_validation_entries_load_unchanged(published: dict[str, Any]) -> None:
    for name, entry in published["models"].items():
        assert ModelSpec.model_validate(entry).num_layers == entry["num_layers"], name
    for name, entry in published["gpus"].items():
        assert GpuSpec.model_validate(entry).hbm_gib == entry["hbm_gib"], name


def test_cluster_topology_must_be_node_link_data() -> None:
    with pytest.raises(ValidationError, match="node-link data with 'nodes' and 'edges' lists"):
        ClusterProfile.model_validate(_cluster(topology={"graph": {}}))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_figures_reject_nan_and_infinity(value: float) -> None:
    with pytest.raises(ValidationError, match="finite number"):
        AlphaBetaFit(latency_us=1, bandwidth_gbps=value, source="x")
