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

Semantics (``ModelSpec``'s fields of that name): ``rms_norm_eps``, ``rope_theta`` and ``rope_scaling`` (YaRN),
or transformers 5's ``rope_parameters`` holding both; Qwen3's QK norm and MLA's latent norms
(``qk_layernorm``); ``norm_topk_prob`` (false: ``moe_router_pre_softmax``), ``scoring_func``,
``routed_scaling_factor``, ``topk_method: noaux_tc`` (expert bias), ``router_aux_loss_coef`` or
``aux_loss_alpha`` with ``seq_aux``, Qwen2-MoE's shared-expert gate, gpt-oss's window, sinks, biases and
clamped activation, DBRX's LayerNorm and ``clip_qkv``. transformers 5 writes ``head_dim: null`` where the
head dimension is the default, and Qwen3-MoE's expert count as ``num_local_experts``: both are read.
"""

from __future__ import annotations

import math
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
        value = self.data.get(key)
        if value is None:  # absent, or null as transformers writes a field left at its default
            value = default
        if isinstance(value, bool) or not isinstance(value, int):
            state = "missing" if key not in self.data else f"{value!r}, not an integer"
            raise SpecError(f"{self.where}: field `{key}` is {state}; {self.arch} needs it as an integer.")
        return value

    def number(self, key: str, default: float | None = None) -> float:
        """A finite number (an integer or a float; JSON's 1e999 reads as infinity and is refused here)."""
        return _finite(self.data.get(key, default), key, self)

    def bool(self, key: str, default: bool) -> bool:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise SpecError(f"{self.where}: field `{key}` is {value!r}; {self.arch} needs true or false.")
        return value

    def nested(self, key: str) -> _Config:
        value = self.data.get(key)
        if not isinstance(value, dict):
            raise SpecError(f"{self.where}: field `{key}` must be a mapping for {self.arch}.")
        return _Config(value, self.arch, f"{self.where} `{key}`")


def _finite(value: Any, key: str, c: _Config) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        state = "missing" if value is None else f"{value!r}, not a finite number"
        raise SpecError(f"{c.where}: field `{key}` is {state}; {c.arch} needs it as a number.")
    return value


def _whole(value: float, key: str, c: _Config) -> int:
    """A number the model takes as an integer (``rope_theta`` is written 1000000.0)."""
    if value != int(value):
        raise SpecError(f"{c.where}: field `{key}` ({value!r}) must be a whole number.")
    return int(value)


def _rope(c: _Config) -> dict[str, Any]:
    """Rotary base and YaRN scaling, from transformers 4's ``rope_theta``/``rope_scaling`` or 5's
    ``rope_parameters``."""
    params = c.get("rope_parameters")
    scaling = params if isinstance(params, dict) else c.get("rope_scaling")
    theta = params.get("rope_theta") if isinstance(params, dict) else c.get("rope_theta")
    out: dict[str, Any] = {}
    if theta is not None:
        out["rotary_base"] = _whole(_finite(theta, "rope_theta", c), "rope_theta", c)
    if isinstance(scaling, dict) and (scaling.get("rope_type") or scaling.get("type")) == "yarn":
        out["yarn"] = {
            key: scaling[key]
            for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                        "mscale_all_dim", "truncate")
            if scaling.get(key) is not None
        }  # fmt: skip
    return out


def _balancing(c: _Config) -> dict[str, Any]:
    """The load-balancing loss: DeepSeek's ``aux_loss_alpha`` (sequence-wise with ``seq_aux``), or
    ``router_aux_loss_coef``."""
    if c.get("aux_loss_alpha") is not None:
        kind = "seq_aux_loss" if c.get("seq_aux") else "aux_loss"
        return {"moe_router_load_balancing_type": kind, "moe_aux_loss_coeff": c.number("aux_loss_alpha")}
    if c.get("router_aux_loss_coef") is not None:
        return {
            "moe_router_load_balancing_type": "aux_loss",
            "moe_aux_loss_coeff": c.number("router_aux_loss_coef"),
        }
    return {}


def _common(c: _Config) -> dict[str, Any]:
    heads = c.int("num_attention_heads")
    hidden = c.int("hidden_size")
    out = {
        "num_layers": c.int("num_hidden_layers"),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_query_groups": c.int("num_key_value_heads", heads),
        # transformers 5 writes head_dim null where it is hidden / heads: _Config.int gives the default.
        "kv_channels": c.int("head_dim", hidden // heads if heads else 0),
        "vocab_size": c.int("vocab_size"),
        "untie_embeddings_and_output_weights": not c.bool("tie_word_embeddings", False),
        "gated_linear_unit": True,
        **_rope(c),
    }
    if c.get("rms_norm_eps") is not None:
        out["norm_epsilon"] = c.number("rms_norm_eps")
    return out


def _dense(c: _Config) -> dict[str, Any]:
    bias = c.get("attention_bias", c.arch == "Qwen2ForCausalLM")
    fields = {**_common(c), "ffn_hidden_size": c.int("intermediate_size"), "add_qkv_bias": bool(bias)}
    if c.arch == "Qwen3ForCausalLM":
        fields["qk_layernorm"] = True  # Qwen3Attention's q_norm and k_norm
    return fields


def _mixtral(c: _Config) -> dict[str, Any]:
    width = c.int("intermediate_size")
    return {
        **_common(c),
        "ffn_hidden_size": width,
        "num_experts": c.int("num_local_experts"),
        "moe_ffn_hidden_size": width,
        "moe_router_topk": c.int("num_experts_per_tok"),
        **_balancing(c),
    }


def _leading_dense_layers(c: _Config, num_layers: int) -> int:
    """Qwen MoE's sparse-layer pattern as a count of leading dense layers, or a clear error."""
    step = c.int("decoder_sparse_step", 1)
    listed = c.get("mlp_only_layers") or []
    if not isinstance(listed, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in listed):
        raise SpecError(f"{c.where}: field `mlp_only_layers` ({listed!r}) must be a list of layer numbers.")
    mlp_only = sorted(listed)
    if step != 1 or mlp_only != list(range(len(mlp_only))) or len(mlp_only) >= num_layers:
        raise SpecError(
            f"{c.where}: decoder_sparse_step {step} with mlp_only_layers {mlp_only} is not supported; "
            "moeplan models MoE layers as every layer after the first k dense ones."
        )
    return len(mlp_only)


def _qwen_moe(c: _Config) -> dict[str, Any]:
    common = _common(c)
    shared = c.int("shared_expert_intermediate_size", 0)
    qwen2 = c.arch == "Qwen2MoeForCausalLM"
    experts = "num_experts" if "num_experts" in c.data else "num_local_experts"  # transformers 5: the latter
    return {
        **common,
        "ffn_hidden_size": c.int("intermediate_size"),
        "num_experts": c.int(experts),
        "moe_ffn_hidden_size": c.int("moe_intermediate_size"),
        "moe_router_topk": c.int("num_experts_per_tok"),
        "shared_expert_ffn_hidden_size": shared,
        "first_k_dense_layers": _leading_dense_layers(c, common["num_layers"]),
        "add_qkv_bias": bool(c.get("qkv_bias", qwen2)),
        "qk_layernorm": not qwen2,  # Qwen3MoeAttention's q_norm and k_norm
        "moe_router_pre_softmax": not c.get("norm_topk_prob", not qwen2),
        "moe_shared_expert_gate": qwen2 and shared > 0,  # Qwen2MoeSparseMoeBlock.shared_expert_gate
        **_balancing(c),
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
        "qk_layernorm": True,  # MLA's kv_a_layernorm (and q_a_layernorm): Megatron's --qk-layernorm under MLA
        "moe_router_score_function": "sigmoid" if c.get("scoring_func") == "sigmoid" else "softmax",
        # Megatron's sigmoid router always renormalises; softmax without norm_topk_prob is pre-softmax.
        "moe_router_pre_softmax": c.get("scoring_func", "softmax") == "softmax"
        and not c.get("norm_topk_prob"),
        "moe_router_enable_expert_bias": c.get("topk_method") == "noaux_tc",
        **(
            {"moe_router_topk_scaling_factor": c.number("routed_scaling_factor")}
            if c.get("routed_scaling_factor") is not None
            else {}
        ),
        **_balancing(c),
    }


def _dbrx(c: _Config) -> dict[str, Any]:
    attn, ffn = c.nested("attn_config"), c.nested("ffn_config")
    heads, hidden = c.int("n_heads"), c.int("d_model")
    width = ffn.int("ffn_hidden_size")
    fields: dict[str, Any] = {
        "num_layers": c.int("n_layers"),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_query_groups": attn.int("kv_n_heads"),
        "kv_channels": hidden // heads if heads else 0,
        "vocab_size": c.int("vocab_size"),
        "untie_embeddings_and_output_weights": not c.bool("tie_word_embeddings", False),
        "gated_linear_unit": True,
        "ffn_hidden_size": width,
        "num_experts": ffn.int("moe_num_experts"),
        "moe_ffn_hidden_size": width,
        "moe_router_topk": ffn.int("moe_top_k"),
        "normalization": "LayerNorm",  # modeling_dbrx.py: nn.LayerNorm(bias=False), torch's eps
        "norm_epsilon": 1e-5,
    }
    if attn.get("rope_theta") is not None:
        fields["rotary_base"] = _whole(attn.number("rope_theta"), "rope_theta", attn)
    if attn.get("clip_qkv") is not None:
        fields["clip_qkv"] = attn.number("clip_qkv")
    if ffn.get("moe_loss_weight") is not None:
        fields |= {
            "moe_router_load_balancing_type": "aux_loss",
            "moe_aux_loss_coeff": ffn.number("moe_loss_weight"),
        }
    return fields


def _gpt_oss(c: _Config) -> dict[str, Any]:
    width = c.int("intermediate_size")
    topk_key = "num_experts_per_tok" if "num_experts_per_tok" in c.data else "experts_per_token"
    fields = {
        **_common(c),
        "ffn_hidden_size": width,
        "num_experts": c.int("num_local_experts"),
        "moe_ffn_hidden_size": width,
        "moe_router_topk": c.int(topk_key),
        "add_qkv_bias": True,
        # gpt-oss's reference model (openai/gpt-oss torch/model.py): biases everywhere, a learned sink per
        # head, the clamped SwiGLU x sigmoid(1.702 x) (x_linear + 1) with limit swiglu_limit.
        "add_bias_linear": True,
        "softmax_type": "learnable",
        "activation": "quick_gelu",
        "glu_linear_offset": 1.0,
        "activation_clamp_value": c.number("swiglu_limit", 7.0),
    }
    window = c.int("sliding_window", 0)
    layer_types = c.get("layer_types")
    alternating = ["sliding_attention", "full_attention"] * (fields["num_layers"] // 2)
    if window and layer_types is not None and layer_types != alternating:
        raise SpecError(
            f"{c.where}: layer_types is not sliding and full attention alternating from the first layer; "
            "moeplan (and Megatron-LM's --window-attn-skip-freq) express only that pattern."
        )
    if window:
        # Alternating from the first layer (layer_types): Megatron's mask keeps window-1 keys before a query.
        fields |= {"window_size": (window - 1, 0), "window_attn_skip_freq": 2}
    return fields


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
