"""Parameter counts of a ModelSpec, total and active per token, as Megatron-Core builds the model.

Notation: H hidden size, V vocabulary, L layers, a query heads, g query groups, d head dim,
E routed experts, k top-k, F dense FFN width, F_e expert width, F_s shared-expert width,
m = 3 for gated (SwiGLU) FFNs and 2 otherwise.

Per layer (RMSNorm weights are H each, no biases unless stated):
- GQA attention: ``H*a*d`` (Q) + ``2*H*g*d`` (K, V) + ``a*d*H`` (output) + ``(a + 2g)*d`` with QKV bias,
  + ``H`` (input norm).
- MLA attention (DeepSeek-V2 eq. 37-47; Megatron ``MLASelfAttention``) with q_lora_rank r_q,
  kv_lora_rank r_kv, head dims d_qk (no rope), d_r (rope), d_v:
  Q = ``H*r_q + r_q + r_q*a*(d_qk + d_r)`` with a low-rank query, else ``H*a*(d_qk + d_r)``;
  KV down = ``H*(r_kv + d_r) + r_kv``; KV up = ``r_kv*a*(d_qk + d_v)``; output ``a*d_v*H``; + ``H``.
- Dense FFN: ``m*H*F + H``.  MoE FFN: router ``H*E`` + ``E*m*H*F_e`` + shared ``m*H*F_s`` + ``H``.
Model: embedding ``V*H``, output layer ``V*H`` when untied, final norm ``H``.
Multi-token prediction (DeepSeek-V3 §2.2): each MTP module adds a projection ``2H*H``, two norms
``2H`` and one MoE decoder layer; it shares the embedding and output layer (not counted again).

Active parameters count only ``k`` of the ``E`` routed experts of each MoE layer; everything else
(embedding and output layer included) is active. Check: Mixtral-8x7B gives 46.70B total, 12.88B
active (published 46.7B / 12.9B); DeepSeek-V3 without MTP 671.0B / 37.5B (published 671B / 37B).
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.schema import ModelSpec

__all__ = ["ParamCounts", "attention_params", "count_params", "ffn_params", "tp_replicated_attention_params"]


@dataclass(frozen=True, slots=True)
class ParamCounts:
    """Parameter counts of a model, split the way memory and FLOPs need them."""

    total: int
    """Every parameter of the decoder, embedding and output layer (MTP excluded)."""
    active: int
    """Parameters used per token: ``total`` less the routed experts a token does not visit."""
    routed_experts: int
    """Parameters of all routed experts (the part sharded over EP x ETP)."""
    embedding_and_output: int
    """Input embedding plus the untied output layer."""
    mtp: int
    """Extra parameters of the multi-token-prediction modules (not in ``total``)."""


def attention_params(model: ModelSpec) -> int:
    """Parameters of one attention block, its input norm included."""
    h, a = model.hidden_size, model.num_attention_heads
    if model.attention == "mla" and model.mla is not None:
        mla = model.mla
        qk_dim = mla.qk_head_dim + mla.qk_pos_emb_head_dim
        if mla.q_lora_rank is not None:
            q = h * mla.q_lora_rank + mla.q_lora_rank + mla.q_lora_rank * a * qk_dim
        else:
            q = h * a * qk_dim
        kv_down = h * (mla.kv_lora_rank + mla.qk_pos_emb_head_dim) + mla.kv_lora_rank
        kv_up = mla.kv_lora_rank * a * (mla.qk_head_dim + mla.v_head_dim)
        return q + kv_down + kv_up + a * mla.v_head_dim * h + h
    d, g = model.head_dim, model.query_groups
    qkv = h * a * d + 2 * h * g * d
    bias = (a + 2 * g) * d if model.add_qkv_bias else 0
    return qkv + bias + a * d * h + h


def tp_replicated_attention_params(model: ModelSpec) -> int:
    """The part of ``attention_params`` Megatron-Core keeps whole on every TP rank: the input norm, and
    under MLA the down-projections and their norms (``parallel_mode='duplicated'`` for ``linear_q_down_proj``
    and ``linear_kv_down_proj``, multi_latent_attention.py:527,574 at Megatron-LM d98e8a6; the q and kv
    layernorms act on their outputs)."""
    h = model.hidden_size
    if model.attention == "mla" and model.mla is not None:
        mla = model.mla
        q_down = h * mla.q_lora_rank + mla.q_lora_rank if mla.q_lora_rank is not None else 0
        kv_down = h * (mla.kv_lora_rank + mla.qk_pos_emb_head_dim) + mla.kv_lora_rank
        return q_down + kv_down + h
    return h


def ffn_params(model: ModelSpec, width: int) -> int:
    """Parameters of one FFN (one expert) of the given width, without norm."""
    matrices = 3 if model.gated_linear_unit else 2
    return matrices * model.hidden_size * width


def count_params(model: ModelSpec) -> ParamCounts:
    """Total and active parameter counts.

    >>> from planner.schema import ModelSpec
    >>> m = ModelSpec(num_layers=2, hidden_size=8, num_attention_heads=2, ffn_hidden_size=16,
    ...               num_experts=4, moe_router_topk=1, vocab_size=10)
    >>> counts = count_params(m)  # attention 264, expert 3*8*16 = 384, router 32, norms 8 per layer
    >>> (counts.total, counts.active, counts.routed_experts)
    (3848, 1544, 3072)
    """
    h = model.hidden_size
    attention = attention_params(model)
    dense_layer = attention + ffn_params(model, model.ffn_hidden_size) + h
    embedding_and_output = model.vocab_size * h * (2 if model.untie_embeddings_and_output_weights else 1)

    moe_layer = moe_layer_active = routed = 0
    if model.num_experts is not None and model.moe_router_topk is not None:
        expert = ffn_params(model, model.expert_ffn_hidden_size)
        shared = ffn_params(model, model.shared_expert_ffn_hidden_size)
        common = attention + h * model.num_experts + shared + h
        moe_layer = common + model.num_experts * expert
        moe_layer_active = common + model.moe_router_topk * expert
        routed = model.num_moe_layers * model.num_experts * expert

    decoder = model.num_dense_layers * dense_layer + model.num_moe_layers * moe_layer
    decoder_active = model.num_dense_layers * dense_layer + model.num_moe_layers * moe_layer_active
    final_norm = h
    mtp_layer = moe_layer if model.is_moe else dense_layer
    mtp = model.mtp_num_layers * (2 * h * h + 2 * h + mtp_layer)
    return ParamCounts(
        total=decoder + embedding_and_output + final_norm,
        active=decoder_active + embedding_and_output + final_norm,
        routed_experts=routed,
        embedding_and_output=embedding_and_output,
        mtp=mtp,
    )
