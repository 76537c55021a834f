"""ModelSpec: a transformer (dense or MoE) described with Megatron-LM's argument names.

The field set is the model entry of the ``moeplan-validation/1`` format
(``../shared/validation/README.md``): a model entry of such a file loads as a ModelSpec unchanged.
Sizes are per layer and per expert, as Megatron's ``--ffn-hidden-size`` and ``--moe-ffn-hidden-size``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from planner.schema._base import Spec
from planner.schema.ranges import Count, Width

__all__ = ["LOAD_BALANCING_TYPES", "MlaSpec", "ModelSpec", "YarnSpec"]

LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")
"""Megatron-LM's ``--moe-router-load-balancing-type`` choices moeplan emits (``sinkhorn`` left out)."""


class MlaSpec(Spec):
    """Multi-head latent attention dimensions (DeepSeek-V2/V3), Megatron's ``MLATransformerConfig`` names."""

    q_lora_rank: Width | None = None
    """Rank of the low-rank query projection; null means a plain (full-rank) query projection (V2-Lite)."""
    kv_lora_rank: Width
    """Rank of the compressed key/value latent (DeepSeek-V3: 512)."""
    qk_head_dim: Width
    """Per-head query/key dimension without the rotary part (DeepSeek-V3: 128)."""
    qk_pos_emb_head_dim: Width
    """Per-head rotary (decoupled RoPE) query/key dimension (DeepSeek-V3: 64)."""
    v_head_dim: Width
    """Per-head value dimension (DeepSeek-V3: 128)."""


class YarnSpec(Spec):
    """YaRN rotary scaling (Peng et al. 2023), Hugging Face's ``rope_scaling`` with ``type: yarn``."""

    factor: float = Field(gt=1)
    """Context extension factor (``--rotary-scaling-factor``; DeepSeek-V2-Lite 40, gpt-oss 32)."""
    original_max_position_embeddings: Width
    """Context the model was trained at before extension (4096 for both)."""
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    """Attention temperature terms (``--mscale``, ``--mscale-all-dim``; DeepSeek's MLA only)."""
    mscale_all_dim: float = 0.0
    truncate: bool = True
    """Round the correction range to whole dimensions (Hugging Face's ``truncate``, default true; gpt-oss
    false; Megatron-LM's ``--[no-]yarn-correction-range-round-to-int``)."""


class ModelSpec(Spec):
    """A decoder-only transformer, dense or Mixture-of-Experts, in Megatron-LM's terms.

    Counts are per model, sizes per layer; an MoE layer has ``num_experts`` routed experts of width
    ``moe_ffn_hidden_size`` each, of which ``moe_router_topk`` are active per token, plus shared
    experts of total width ``shared_expert_ffn_hidden_size``.
    """

    name: str | None = None
    """Catalog name (e.g. ``mixtral-8x7b``); taken from the file name or mapping key when absent."""
    num_layers: Count
    """Decoder layers, dense and MoE together, without multi-token-prediction layers (``--num-layers``)."""
    hidden_size: Width
    """Model width H (``--hidden-size``)."""
    num_attention_heads: Count
    """Query heads (``--num-attention-heads``)."""
    num_query_groups: Count | None = None
    """Key/value heads for GQA (``--num-query-groups``); null means equal to the query heads (MHA).
    Rule: divides ``num_attention_heads``."""
    kv_channels: Width | None = None
    """Head dimension (``--kv-channels``); null means ``hidden_size / num_attention_heads``."""
    attention: Literal["gqa", "mla"] = "gqa"
    """Attention kind: ``gqa`` (MHA/MQA/GQA) or ``mla`` (multi-head latent attention, needs ``mla``)."""
    mla: MlaSpec | None = None
    """MLA dimensions; required when ``attention`` is ``mla``, ignored otherwise."""
    ffn_hidden_size: Width
    """FFN width of the dense layers (``--ffn-hidden-size``). Rule: required unless nothing reads it (an
    MoE model without dense layers that gives ``moe_ffn_hidden_size``); then null or absent means
    Megatron-LM's default (``validate_args``: 4H, or 8H/3 rounded down to a multiple of 64 with SwiGLU)."""
    num_experts: Count | None = None
    """Routed experts per MoE layer (``--num-experts``); 0 or null for a dense model."""
    moe_ffn_hidden_size: Width | None = None
    """FFN width of one routed expert (``--moe-ffn-hidden-size``); null means ``ffn_hidden_size``, as Megatron does."""
    moe_router_topk: Count | None = None
    """Routed experts per token (``--moe-router-topk``). Rule: at most ``num_experts``; required for MoE."""
    shared_expert_ffn_hidden_size: int = Field(default=0, ge=0)
    """Total FFN width of the shared experts of each MoE layer (``--moe-shared-expert-intermediate-size``);
    0 when there are none."""
    first_k_dense_layers: int = Field(default=0, ge=0)
    """Leading layers with a dense FFN instead of an MoE layer (DeepSeek-V3: 3). Rule: below ``num_layers``."""
    mtp_num_layers: int = Field(default=0, ge=0)
    """Multi-token-prediction layers trained after the decoder (``--mtp-num-layers``; DeepSeek-V3: 1)."""
    moe_router_num_groups: Count | None = None
    """Expert groups for group-limited (node-limited) routing (``--moe-router-num-groups``; DeepSeek-V3: 8).
    Rule: divides ``num_experts``."""
    moe_router_group_topk: Count | None = None
    """Groups a token may be routed to (``--moe-router-group-topk``; DeepSeek-V3: 4).
    Rule: at most ``moe_router_num_groups``."""
    vocab_size: Annotated[int, Field(gt=0, le=100_000_000)]
    """Vocabulary size (``--vocab-size``, before Megatron pads it)."""
    gated_linear_unit: bool = True
    """SwiGLU-style FFN with three matrices (true) or a two-matrix GELU MLP (false) (``--swiglu``)."""
    untie_embeddings_and_output_weights: bool = True
    """Separate input embedding and output layer (``--untie-embeddings-and-output-weights``). Every catalog
    model unties them; the validation format does not state it, so untied is the default."""
    add_qkv_bias: bool = False
    """Bias on the query/key/value projections (``--add-qkv-bias``; Qwen2, GPT-OSS)."""

    # What the model computes beyond its sizes: Megatron-LM's flags of the same names. A null field was not
    # stated by the model's source, and Megatron-LM's default applies; the emitted arguments say which.
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """``--normalization`` (DBRX: LayerNorm)."""
    norm_epsilon: float | None = Field(default=None, gt=0)
    """``--norm-epsilon``, Hugging Face's ``rms_norm_eps`` (null: Megatron's 1e-5)."""
    rotary_base: Annotated[int, Field(gt=0, le=10**12)] | None = None
    """``--rotary-base``, Hugging Face's ``rope_theta`` (null: Megatron's 10000)."""
    yarn: YarnSpec | None = None
    """YaRN rotary scaling the model trains with; null: plain RoPE."""
    qk_layernorm: bool = False
    """``--qk-layernorm``: RMSNorm on each head's queries and keys (Qwen3), or MLA's latent norms (DeepSeek)."""
    window_size: tuple[Width, Literal[0]] | None = None
    """``--window-size``: sliding-window attention, (keys before, keys after) a query (gpt-oss: (127, 0),
    a 128-token window); null: full causal attention."""
    window_attn_skip_freq: PositiveInt | None = None
    """``--window-attn-skip-freq``: every N-th layer attends fully (gpt-oss: 2, alternating)."""
    softmax_type: Literal["vanilla", "off-by-one", "learnable"] = "vanilla"
    """``--softmax-type``: ``learnable`` adds a learned per-head sink logit to the softmax (gpt-oss)."""
    add_bias_linear: bool = False
    """Biases on every linear layer, experts and router included (Megatron-LM's default; gpt-oss). False is
    ``--disable-bias-linear``."""
    activation: Literal["silu", "gelu", "quick_gelu"] = "silu"
    """The FFN's activation: with ``gated_linear_unit``, ``silu`` is SwiGLU (``--swiglu``) and ``quick_gelu``
    gpt-oss's ``--quick-geglu``; without it, a GELU MLP."""
    glu_linear_offset: float = Field(default=0.0, ge=0, le=1e3)
    """``--glu-linear-offset``: added to the GLU's linear half (gpt-oss: 1.0)."""
    activation_clamp_value: float | None = Field(default=None, gt=0)
    """``--activation-func-clamp-value`` (gpt-oss: 7.0)."""
    clip_qkv: float | None = Field(default=None, gt=0)
    """DBRX clamps the fused QKV projection to +-clip_qkv; Megatron-LM has no such setting."""
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    """``--moe-router-score-function`` (DeepSeek-V3, Moonlight: sigmoid)."""
    moe_router_pre_softmax: bool = False
    """``--moe-router-pre-softmax``: softmax over all experts, then top-k, not renormalised (Hugging Face's
    ``norm_topk_prob: false``: Qwen2-MoE, DeepSeek-V2). False: top-k, then softmax over the k, which equals
    softmax, top-k and renormalising (Mixtral, Qwen3)."""
    moe_router_topk_scaling_factor: float | None = Field(default=None, gt=0)
    """``--moe-router-topk-scaling-factor``, Hugging Face's ``routed_scaling_factor`` (DeepSeek-V3: 2.5)."""
    moe_router_enable_expert_bias: bool = False
    """``--moe-router-enable-expert-bias``: auxiliary-loss-free balancing by a per-expert selection bias
    (DeepSeek-V3's ``noaux_tc``). Rule: needs the sigmoid score function."""
    moe_router_bias_update_rate: float | None = Field(default=None, gt=0)
    """``--moe-router-bias-update-rate`` (null: Megatron's 1e-3)."""
    moe_router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "none"] | None = (
        None
    )
    """``--moe-router-load-balancing-type`` (null: Megatron's aux_loss)."""
    moe_aux_loss_coeff: float | None = Field(default=None, ge=0)
    """``--moe-aux-loss-coeff`` (null: Megatron's 0.0, which balances nothing)."""
    moe_z_loss_coeff: float | None = Field(default=None, gt=0)
    """``--moe-z-loss-coeff`` (null: none)."""
    moe_shared_expert_gate: bool = False
    """``--moe-shared-expert-gate``: a sigmoid gate on the shared experts' output (Qwen2-MoE)."""
    mtp_loss_scaling_factor: float | None = Field(default=None, gt=0)
    """``--mtp-loss-scaling-factor`` (null: Megatron's 0.1)."""
    source: str | None = None
    """Where every number above comes from (config file, paper, repository at a commit)."""
    semantics_source: str | None = None
    """Where the semantics fields come from (the released config, the report, the recipes that agree)."""
    notes: str | None = None
    """Assumptions made where the source is silent."""

    @model_validator(mode="before")
    @classmethod
    def _unused_ffn_width_may_be_unstated(cls, data: Any) -> Any:
        # Only where nothing reads it: an MoE model with no dense layer and its experts' width given.
        # Elsewhere a default would silently train another model, so it stays required.
        if not isinstance(data, dict) or data.get("ffn_hidden_size") is not None:
            return data
        unused = (
            data.get("num_experts")
            and not data.get("first_k_dense_layers")
            and data.get("moe_ffn_hidden_size")
        )
        h = data.get("hidden_size")
        if not unused or not isinstance(h, int) or h <= 0:
            raise ValueError(
                "ffn_hidden_size is not given; it may be left out only for an MoE model without dense layers "
                "(first_k_dense_layers 0) that gives moe_ffn_hidden_size"
            )
        swiglu = data.get("gated_linear_unit", True)
        return {**data, "ffn_hidden_size": int(4 * h * 2 / 3 / 64) * 64 if swiglu else 4 * h}

    @field_validator("num_experts", mode="before")
    @classmethod
    def _zero_experts_means_dense(cls, value: Any) -> Any:
        # The validation format and Megatron both use 0 for "no experts" (Megatron normalises 0 to None).
        return None if value == 0 else value

    @field_validator("shared_expert_ffn_hidden_size", "first_k_dense_layers", "mtp_num_layers", mode="before")
    @classmethod
    def _null_means_zero(cls, value: Any) -> Any:
        return 0 if value is None else value

    @model_validator(mode="after")
    def _check_rules(self) -> ModelSpec:
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ValueError(
                f"num_query_groups ({groups}) must divide num_attention_heads ({self.num_attention_heads})"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}) when kv_channels is not given"
            )
        if self.attention == "mla" and self.mla is None:
            raise ValueError("attention is 'mla', so the mla dimensions must be given")
        if self.first_k_dense_layers >= self.num_layers and self.num_experts is not None:
            raise ValueError(
                f"first_k_dense_layers ({self.first_k_dense_layers}) must be below num_layers "
                f"({self.num_layers}) for an MoE model"
            )
        if self.moe_router_enable_expert_bias and self.moe_router_score_function != "sigmoid":
            raise ValueError(
                "moe_router_enable_expert_bias needs moe_router_score_function sigmoid (Megatron-Core's rule)"
            )
        if self.window_attn_skip_freq is not None and self.window_size is None:
            raise ValueError("window_attn_skip_freq is given, so window_size must be given too")
        if self.num_experts is None:
            return self
        if self.moe_router_topk is None:
            raise ValueError(f"num_experts is {self.num_experts}, so moe_router_topk must be given")
        if self.moe_router_topk > self.num_experts:
            raise ValueError(
                f"moe_router_topk ({self.moe_router_topk}) must be at most num_experts ({self.num_experts})"
            )
        self._check_group_routing(self.num_experts, self.moe_router_topk)
        return self

    def _check_group_routing(self, num_experts: int, topk: int) -> None:
        num_groups, group_topk = self.moe_router_num_groups, self.moe_router_group_topk
        if (num_groups is None) != (group_topk is None):
            raise ValueError("moe_router_num_groups and moe_router_group_topk must be given together")
        if num_groups is None or group_topk is None:
            return
        if num_experts % num_groups:
            raise ValueError(f"moe_router_num_groups ({num_groups}) must divide num_experts ({num_experts})")
        if group_topk > num_groups:
            raise ValueError(
                f"moe_router_group_topk ({group_topk}) must be at most moe_router_num_groups ({num_groups})"
            )
        if topk > group_topk * (num_experts // num_groups):
            raise ValueError(
                f"moe_router_topk ({topk}) must be at most moe_router_group_topk x experts per group "
                f"({group_topk} x {num_experts // num_groups})"
            )

    # Derived quantities: one definition each, used by the cost model, feasibility and the runtime.
    @property
    def is_moe(self) -> bool:
        """True when the model has routed experts."""
        return self.num_experts is not None

    @property
    def query_groups(self) -> int:
        """Key/value heads (GQA groups), resolving the MHA default."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        """Per-head dimension, resolving the ``hidden_size / heads`` default."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def expert_ffn_hidden_size(self) -> int:
        """Width of one routed expert, resolving Megatron's default to ``ffn_hidden_size``."""
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def num_moe_layers(self) -> int:
        """Decoder layers with an MoE FFN (MTP layers not counted)."""
        return self.num_layers - self.first_k_dense_layers if self.is_moe else 0

    @property
    def num_dense_layers(self) -> int:
        """Decoder layers with a dense FFN."""
        return self.num_layers - self.num_moe_layers
