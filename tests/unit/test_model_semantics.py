"""What each catalog model computes beyond its sizes, checked against its released configuration, and
carried into the Megatron-LM arguments (issue 18 items 1 and 2).

The expected values are typed here from the sources the catalog cites (Hugging Face config.json files,
the DeepSeek-V3 report, the gpt-oss reference model), not read from the catalog: a catalog edit that
drifts from the release fails here.
"""

from __future__ import annotations

from typing import Any

import pytest

from planner.catalog import load_model
from planner.catalog.hf_config import model_fields_from_hf_config
from planner.emit.megatron import emit_megatron, megatron_args
from planner.errors import SpecError
from planner.feasibility import check_plan
from planner.schema import ClusterRef, ModelRef, ModelSpec, ParallelConfig, Plan, PlanProvenance, TrainingSpec

RELEASED: dict[str, dict[str, Any]] = {
    # rope_theta, rms_norm_eps, router, balancing, QK norm, shared-expert gate.
    "mixtral-8x7b": {"rotary_base": 1_000_000, "norm_epsilon": 1e-5, "moe_router_score_function": "softmax",
                         "moe_router_pre_softmax": False, "moe_router_load_balancing_type": "aux_loss",
                         "moe_aux_loss_coeff": 0.02, "qk_layernorm": False},
    "mixtral-8x22b": {"rotary_base": 1_000_000, "norm_epsilon": 1e-5, "moe_router_pre_softmax": False,
                          "moe_aux_loss_coeff": 0.001},
    "dbrx": {"rotary_base": 500_000, "normalization": "LayerNorm", "clip_qkv": 8.0, "moe_aux_loss_coeff": 0.05},
    "deepseek-v2-lite": {"rotary_base": 10_000, "norm_epsilon": 1e-6, "qk_layernorm": True, "moe_router_pre_softmax": True,
                             "moe_router_topk_scaling_factor": 1.0, "moe_router_load_balancing_type": "seq_aux_loss",
                             "moe_aux_loss_coeff": 0.001},
    "deepseek-v3": {"rotary_base": 10_000, "norm_epsilon": 1e-6, "qk_layernorm": True,
                        "moe_router_score_function": "sigmoid", "moe_router_topk_scaling_factor": 2.5,
                        "moe_router_enable_expert_bias": True, "moe_router_bias_update_rate": 0.001,
                        "moe_router_load_balancing_type": "seq_aux_loss", "moe_aux_loss_coeff": 0.0001,
                        "mtp_loss_scaling_factor": 0.3},
    "moonlight-16b-a3b": {"rotary_base": 50_000, "norm_epsilon": 1e-5, "moe_router_score_function": "sigmoid",
                              "moe_router_topk_scaling_factor": 2.446, "moe_router_enable_expert_bias": True,
                              "moe_router_load_balancing_type": "seq_aux_loss", "moe_aux_loss_coeff": 0.001},
    "qwen2-57b-a14b": {"rotary_base": 1_000_000, "norm_epsilon": 1e-6, "add_qkv_bias": True, "moe_router_pre_softmax": True,
                           "moe_shared_expert_gate": True, "moe_aux_loss_coeff": 0.001},
    "qwen3-30b-a3b": {"rotary_base": 1_000_000, "norm_epsilon": 1e-6, "qk_layernorm": True, "moe_router_pre_softmax": False,
                          "moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 0.001},
    "qwen3-235b-a22b": {"rotary_base": 1_000_000, "norm_epsilon": 1e-6, "qk_layernorm": True,
                            "moe_router_pre_softmax": False, "moe_aux_loss_coeff": 0.001},
    "gpt-oss-120b": {"rotary_base": 150_000, "norm_epsilon": 1e-5, "window_size": (127, 0), "window_attn_skip_freq": 2,
                         "softmax_type": "learnable", "add_bias_linear": True, "add_qkv_bias": True,
                         "activation": "quick_gelu", "glu_linear_offset": 1.0, "activation_clamp_value": 7.0},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_catalog_semantics_match_the_release(name: str) -> None:
    model = load_model(name)
    for field, value in RELEASED[name].items():
        assert getattr(model, field) == value, field
    assert model.semantics_source


def _plan(model: str, world: int = 8, **degrees: Any) -> Plan:
    return Plan(
        model=ModelRef(name=model, source="catalog"),
        cluster=ClusterRef(name="dgx-h100", source="bundled"),
        num_nodes=world // 8,
        num_gpus_per_node=8,
        num_gpus=world,
        training=TrainingSpec(seq_len=4096, global_batch=64),
        parallel=ParallelConfig.for_world(world, ep=8, **degrees),
        provenance=PlanProvenance(moeplan_version="0.1.0"),
    )


def _flags(args: list[str]) -> str:
    return " " + " ".join(args) + " "


@pytest.mark.parametrize(
    ("name", "expected", "absent"),
    [
        ("mixtral-8x7b", ["--rotary-base 1000000", "--moe-router-load-balancing-type aux_loss",
                          "--moe-aux-loss-coeff 0.02", "--norm-epsilon 1e-05"], ["--moe-router-pre-softmax"]),
        ("qwen3-30b-a3b", ["--qk-layernorm", "--rotary-base 1000000", "--moe-aux-loss-coeff 0.001"],
         ["--moe-router-pre-softmax"]),
        ("qwen2-57b-a14b", ["--moe-router-pre-softmax", "--moe-shared-expert-gate", "--add-qkv-bias"], []),
        ("deepseek-v2-lite", ["--moe-router-pre-softmax", "--rotary-scaling-factor 40", "--mscale 0.707",
                              "--mscale-all-dim 0.707", "--moe-router-load-balancing-type seq_aux_loss",
                              "--moe-router-topk-scaling-factor 1.0"], ["--rope-type"]),
        ("deepseek-v3", ["--moe-router-score-function sigmoid", "--moe-router-enable-expert-bias",
                         "--moe-router-bias-update-rate 0.001", "--moe-router-topk-scaling-factor 2.5",
                         "--moe-aux-loss-coeff 0.0001", "--mtp-loss-scaling-factor 0.3", "--rope-type rope",
                         "--qk-layernorm"], ["--rotary-scaling-factor"]),
        ("moonlight-16b-a3b", ["--moe-router-score-function sigmoid", "--rotary-base 50000",
                               "--moe-router-topk-scaling-factor 2.446"], []),
    ],
)  # fmt: skip
def test_megatron_arguments_train_the_named_model(name: str, expected: list[str], absent: list[str]) -> None:
    text = _flags(megatron_args(_plan(name), load_model(name)))
    for flag in expected:
        assert f" {flag} " in text, flag
    for flag in absent:
        assert f" {flag} " not in text, flag


def test_what_megatron_cannot_train_is_refused_with_the_reason() -> None:
    with pytest.raises(SpecError, match="clip_qkv .* has no Megatron-LM equivalent"):
        megatron_args(_plan("dbrx"), load_model("dbrx"))
    with pytest.raises(
        SpecError, match="yarn .* has no Megatron-LM training flags before megatron_version 0.19"
    ):
        megatron_args(_plan("gpt-oss-120b"), load_model("gpt-oss-120b"), "0.18")
    # MLA's YaRN is MLATransformerConfig's fixed form at every release: another original context is refused.
    lite = load_model("deepseek-v2-lite")
    assert lite.yarn is not None
    other = lite.model_copy(update={"yarn": lite.yarn.model_copy(update={"beta_fast": 16.0})})
    with pytest.raises(SpecError, match="multi-latent attention's YaRN has original context 4096"):
        megatron_args(_plan("deepseek-v2-lite"), other, "0.19")


def test_gpt_oss_yarn_from_megatron_0_19() -> None:
    """gpt-oss's YaRN as released (factor 32 over 4096 tokens, betas 32 and 1, correction range not
    rounded: its config's ``truncate: false``), as Megatron-LM 0.19's flags for attention other than MLA."""
    text = _flags(megatron_args(_plan("gpt-oss-120b"), load_model("gpt-oss-120b"), "0.19"))
    for flag in ("--position-embedding-type yarn", "--rotary-scaling-factor 32", "--rotary-base 150000",
                 "--yarn-original-max-position-embeddings 4096", "--yarn-beta-fast 32", "--yarn-beta-slow 1",
                 "--no-yarn-correction-range-round-to-int"):  # fmt: skip
        assert f" {flag} " in text, flag
    assert " --position-embedding-type rope " not in text


def test_gpt_oss_without_yarn_carries_its_attention_and_activation() -> None:
    model = load_model("gpt-oss-120b").model_copy(update={"yarn": None})
    text = _flags(megatron_args(_plan("gpt-oss-120b"), model))
    for flag in ("--window-size 127,0", "--window-attn-skip-freq 2", "--softmax-type learnable", "--quick-geglu",
                 "--glu-linear-offset 1.0", "--activation-func-clamp-value 7.0", "--rotary-base 150000"):  # fmt: skip
        assert f" {flag} " in text, flag
    assert " --disable-bias-linear " not in text and " --swiglu " not in text
    with pytest.raises(SpecError, match="needs megatron_version 0.15"):
        megatron_args(_plan("gpt-oss-120b"), model, "0.14")


def test_expert_biases_need_etp_1() -> None:
    model, training = load_model("gpt-oss-120b"), TrainingSpec(seq_len=4096, global_batch=64)
    broken = check_plan(model, training, ParallelConfig.for_world(16, tp=2, ep=8, etp=2), 16)
    assert any(v.field == "etp" and "expert bias" in v.rule for v in broken)


def test_unstated_semantics_are_named_in_the_snippet() -> None:
    snippet = emit_megatron(_plan("tiny-moe"), load_model("tiny-moe"))
    assert "Not stated by the model, so Megatron-LM's defaults train:" in snippet
    assert "load-balancing coefficient (Megatron-LM's 0.0: nothing is balanced)" in " ".join(
        line.lstrip("# ") for line in snippet.splitlines()
    )
    assert "Not stated" not in emit_megatron(_plan("qwen3-30b-a3b"), load_model("qwen3-30b-a3b"))


def test_expert_bias_needs_sigmoid() -> None:
    fields = load_model("qwen3-30b-a3b").model_dump() | {"moe_router_enable_expert_bias": True}
    with pytest.raises(ValueError, match="needs moe_router_score_function sigmoid"):
        ModelSpec.model_validate(fields)


# Hugging Face configs as transformers 4 and 5 write them.


def _qwen3_moe(**extra: Any) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 48, "hidden_size": 2048,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144,
        "num_experts": 128, "moe_intermediate_size": 768, "num_experts_per_tok": 8, "vocab_size": 151936,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "norm_topk_prob": True, "router_aux_loss_coef": 0.001,
        **extra,
    }  # fmt: skip


def test_hf_import_of_qwen3_moe_from_transformers_4_and_5() -> None:
    four = ModelSpec.model_validate(model_fields_from_hf_config(_qwen3_moe(), "config.json"))
    five_config = _qwen3_moe(
        num_local_experts=128, rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}
    )
    del five_config["num_experts"], five_config["rope_theta"]
    five = ModelSpec.model_validate(model_fields_from_hf_config(five_config, "config.json"))
    assert four.model_dump(exclude={"source"}) == five.model_dump(exclude={"source"})
    qwen = load_model("qwen3-30b-a3b")
    for field in ("rotary_base", "norm_epsilon", "qk_layernorm", "moe_router_pre_softmax", "moe_aux_loss_coeff",
                  "moe_router_load_balancing_type", "num_experts", "kv_channels"):  # fmt: skip
        assert getattr(four, field) == getattr(qwen, field), field


def test_hf_import_reads_mixtral_with_a_null_head_dim() -> None:
    config = {
        "architectures": ["MixtralForCausalLM"], "num_hidden_layers": 32, "hidden_size": 4096,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "intermediate_size": 14336,
        "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000, "rope_theta": 1e6,
        "rms_norm_eps": 1e-5, "router_aux_loss_coef": 0.02,
    }  # fmt: skip
    model = ModelSpec.model_validate(model_fields_from_hf_config(config, "config.json"))
    assert model.kv_channels == 128 and model.rotary_base == 1_000_000 and model.moe_aux_loss_coeff == 0.02


def test_hf_import_of_deepseek_v3_routing() -> None:
    config = {
        "architectures": ["DeepseekV3ForCausalLM"], "num_hidden_layers": 61, "hidden_size": 7168,
        "num_attention_heads": 128, "num_key_value_heads": 128, "intermediate_size": 18432, "q_lora_rank": 1536,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 256, "moe_intermediate_size": 2048, "num_experts_per_tok": 8, "n_shared_experts": 1,
        "first_k_dense_replace": 3, "n_group": 8, "topk_group": 4, "num_nextn_predict_layers": 1,
        "vocab_size": 129280, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
        "routed_scaling_factor": 2.5, "rope_theta": 10000, "rms_norm_eps": 1e-6,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    }  # fmt: skip
    model = ModelSpec.model_validate(model_fields_from_hf_config(config, "config.json"))
    assert (model.moe_router_score_function, model.moe_router_enable_expert_bias) == ("sigmoid", True)
    assert (model.moe_router_pre_softmax, model.moe_router_topk_scaling_factor) == (False, 2.5)
    assert model.yarn is not None and model.yarn.factor == 40 and model.qk_layernorm
    # The released config leaves the balancing loss out: the import does not invent one.
    assert model.moe_aux_loss_coeff is None


def test_hf_import_reads_nulls_as_defaults_and_refuses_strings_for_booleans() -> None:
    config = _qwen3_moe(num_key_value_heads=None)  # transformers writes null for "as many as the heads"
    assert ModelSpec.model_validate(model_fields_from_hf_config(config, "c.json")).num_query_groups == 32
    with pytest.raises(SpecError, match=r"field `tie_word_embeddings` is 'false'; .* needs true or false"):
        model_fields_from_hf_config(_qwen3_moe(tie_word_embeddings="false"), "c.json")
