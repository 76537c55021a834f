"""Map a Hugging Face ``config.json`` onto a ModelSpec (Megatron names).

Supported architectures and the keys read (transformers' config classes):
- ``MixtralForCausalLM``: ``num_local_experts``, ``num_experts_per_tok``, ``intermediate_size`` (expert width).
- ``Qwen2MoeForCausalLM`` / ``Qwen3MoeForCausalLM``: ``num_experts``, ``num_experts_per_tok``,
  ``moe_intermediate_size``, ``shared_expert_intermediate_size`` (Qwen2), ``decoder_sparse_step`` and
  ``mlp_only_layers`` (only the every-layer-sparse or leading-dense patterns are representable).
- ``DeepseekV2ForCausalLM`` / ``DeepseekV3ForCausalLM``: MLA ranks and head dims, ``n_routed_experts``,
  ``n_shared_experts`` (a count: width = count x ``moe_intermediate_size``), ``first_k_dense_replace``,
  ``n_group``/``topk_group`` (1 group = no group limit), ``num_nextn_predict_layers`` (MTP).
- ``DbrxForCausalLM``: ``d_model``, ``n_heads``, ``n_layers``, ``attn_config.kv_n_heads``,
  ``ffn_config.{ffn_hidden_size, moe_num_experts, moe_top_k}``.
- ``GptOssForCausalLM``: ``num_local_experts``, ``num_experts_per_tok`` (or ``experts_per_token``).
- Dense ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from planner.errors import SpecError

__all__ = ["SUPPORTED_ARCHITECTURES", "model_fields_from_hf_config"]


class _Config:
    """Typed access to config.json keys that names the missing key in its error."""

    def __init__(self, data: dict[str, Any], arch: str, where: str) -> None:
        self.data, self.arch, self.where = data, arch, where

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def int(self, key: str, default: int | None = None) -> int:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            state = "missing" if key not in self.data else f"{value!r}, not an integer"
            raise SpecError(f"{self.where}: field `{key}` is {state}; {self.arch} needs it as an integer.")
        return value

    def nested(self, key: str) -> _Config:
        value = self.data.get(key)
        if not isinstance(value, dict):
            raise SpecError(f"{self.where}: field `{key}` must be a mapping for {self.arch}.")
        return _Config(value, self.arch, f"{self.where} `{key}`")


def _common(c: _Config) -> dict[str, Any]:
    heads = c.int("num_attention_heads")
    hidden = c.int("hidden_size")
    return {
        "num_layers": c.int("num_hidden_layers"),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_query_groups": c.int("num_key_value_heads", heads),
        "kv_channels": c.int("head_dim", hidden // heads if heads else 0),
        "vocab_size": c.int("vocab_size"),
        "untie_embeddings_and_output_weights": not c.get("tie_word_embeddings", False),
        "gated_linear_unit": True,
    }


def _dense(c: _Config) -> dict[str, Any]:
    bias = c.get("attention_bias", c.arch == "Qwen2ForCausalLM")
    return {**_common(c), "ffn_hidden_size": c.int("intermediate_size"), "add_qkv_bias": bool(bias)}


def _mixtral(c: _Config) -> dict[str, Any]:
    width = c.int("intermediate_size")
    return {
        **_common(c),
        "ffn_hidden_size": width,
        "num_experts": c.int("num_local_experts"),
        "moe_ffn_hidden_size": width,
        "moe_router_topk": c.int("num_experts_per_tok"),
    }


def _leading_dense_layers(c: _Config, num_layers: int) -> int:
    """Qwen MoE's sparse-layer pattern as a count of leading dense layers, or a clear error."""
    step = c.int("decoder_sparse_step", 1)
    mlp_only = sorted(c.get("mlp_only_layers") or [])
    if step != 1 or mlp_only != list(range(len(mlp_only))) or len(mlp_only) >= num_layers:
        raise SpecError(
            f"{c.where}: decoder_sparse_step {step} with mlp_only_layers {mlp_only} is not supported; "
            "moeplan models MoE layers as every layer after the first k dense ones."
        )
    return len(mlp_only)


def _qwen_moe(c: _Config) -> dict[str, Any]:
    common = _common(c)
    shared = c.int("shared_expert_intermediate_size", 0)
    return {
        **common,
        "ffn_hidden_size": c.int("intermediate_size"),
        "num_experts": c.int("num_experts"),
        "moe_ffn_hidden_size": c.int("moe_intermediate_size"),
        "moe_router_topk": c.int("num_experts_per_tok"),
        "shared_expert_ffn_hidden_size": shared,
        "first_k_dense_layers": _leading_dense_layers(c, common["num_layers"]),
        "add_qkv_bias": bool(c.get("qkv_bias", c.arch == "Qwen2MoeForCausalLM")),
    }


def _deepseek(c: _Config) -> dict[str, Any]:
    if c.int("moe_layer_freq", 1) != 1:
        raise SpecError(f"{c.where}: moe_layer_freq {c.get('moe_layer_freq')} is not supported (only 1).")
    expert_width = c.int("moe_intermediate_size")
    num_groups = c.int("n_group", 1)
    q_lora = c.get("q_lora_rank")
    return {
        **_common(c),
        "kv_channels": c.int("qk_nope_head_dim"),
        "attention": "mla",
        "mla": {
            "q_lora_rank": q_lora,
            "kv_lora_rank": c.int("kv_lora_rank"),
            "qk_head_dim": c.int("qk_nope_head_dim"),
            "qk_pos_emb_head_dim": c.int("qk_rope_head_dim"),
            "v_head_dim": c.int("v_head_dim"),
        },
        "ffn_hidden_size": c.int("intermediate_size"),
        "num_experts": c.int("n_routed_experts"),
        "moe_ffn_hidden_size": expert_width,
        "moe_router_topk": c.int("num_experts_per_tok"),
        "shared_expert_ffn_hidden_size": c.int("n_shared_experts", 0) * expert_width,
        "first_k_dense_layers": c.int("first_k_dense_replace", 0),
        "mtp_num_layers": c.int("num_nextn_predict_layers", 0),
        "moe_router_num_groups": num_groups if num_groups > 1 else None,
        "moe_router_group_topk": c.int("topk_group") if num_groups > 1 else None,
    }


def _dbrx(c: _Config) -> dict[str, Any]:
    attn, ffn = c.nested("attn_config"), c.nested("ffn_config")
    heads, hidden = c.int("n_heads"), c.int("d_model")
    width = ffn.int("ffn_hidden_size")
    return {
        "num_layers": c.int("n_layers"),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_query_groups": attn.int("kv_n_heads"),
        "kv_channels": hidden // heads if heads else 0,
        "vocab_size": c.int("vocab_size"),
        "untie_embeddings_and_output_weights": not c.get("tie_word_embeddings", False),
        "gated_linear_unit": True,
        "ffn_hidden_size": width,
        "num_experts": ffn.int("moe_num_experts"),
        "moe_ffn_hidden_size": width,
        "moe_router_topk": ffn.int("moe_top_k"),
    }


def _gpt_oss(c: _Config) -> dict[str, Any]:
    width = c.int("intermediate_size")
    topk_key = "num_experts_per_tok" if "num_experts_per_tok" in c.data else "experts_per_token"
    return {
        **_common(c),
        "ffn_hidden_size": width,
        "num_experts": c.int("num_local_experts"),
        "moe_ffn_hidden_size": width,
        "moe_router_topk": c.int(topk_key),
        "add_qkv_bias": True,
    }


_MAPPERS: dict[str, Callable[[_Config], dict[str, Any]]] = {
    "MixtralForCausalLM": _mixtral,
    "Qwen2MoeForCausalLM": _qwen_moe,
    "Qwen3MoeForCausalLM": _qwen_moe,
    "DeepseekV2ForCausalLM": _deepseek,
    "DeepseekV3ForCausalLM": _deepseek,
    "DbrxForCausalLM": _dbrx,
    "GptOssForCausalLM": _gpt_oss,
    "LlamaForCausalLM": _dense,
    "MistralForCausalLM": _dense,
    "Qwen2ForCausalLM": _dense,
    "Qwen3ForCausalLM": _dense,
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(_MAPPERS))


def model_fields_from_hf_config(data: dict[str, Any], where: str) -> dict[str, Any]:
    """ModelSpec fields (not yet validated) from a parsed config.json."""
    architectures = data.get("architectures")
    if not isinstance(architectures, list) or not architectures or not isinstance(architectures[0], str):
        raise SpecError(
            f"{where}: field `architectures` ({architectures!r}) must be a list naming the model class, "
            f"one of {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    arch = architectures[0]
    mapper = _MAPPERS.get(arch)
    if mapper is None:
        raise SpecError(
            f"{where}: architecture '{arch}' is not supported; moeplan maps "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}. Write the model as a moeplan model YAML instead."
        )
    fields = mapper(_Config(data, arch, where))
    fields["source"] = f"Hugging Face config.json ({arch}) at {where}"
    return fields
