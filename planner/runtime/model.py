"""The runtime's Mixture-of-Experts decoder: single-device model code, parallelism applied from outside.

Shape legend for tensor-name suffixes: B batch, S sequence, H hidden, T tokens (B*S), K top-k,
N routed pairs (T*K), E experts (global), F FFN hidden, D head dim, V vocabulary.

Expert parallelism touches only two places: each MoE layer holds experts [ep_rank*E/ep, (ep_rank+1)*E/ep)
(``LocalExperts``) and moves tokens with a pluggable ``TokenDispatcher`` (``planner/runtime/protocols.py``).
Tensor parallelism is left to the caller: every dense projection is a plain ``nn.Linear`` attribute
(``q_proj k_proj v_proj o_proj``; FFN ``w1`` gate, ``w3`` up, ``w2`` down) and attention reads its head
counts from the projection widths, so sharding a projection needs no change here.

Routing (Mixtral, and Megatron's default ``--moe-router-pre-softmax`` off): ``p_TE = softmax(x W_g)``,
the K largest per token, weights renormalised to sum to 1 (so top-1 routing has weight 1 and the gate
learns from the auxiliary losses alone).

Load-balancing loss (Switch Transformer, Fedus et al., arXiv 2101.03961, eq. 4-6; GShard's for top-k)::

    L_balance = E * sum_e f_e * P_e
    f_e = (routed (token, expert) pairs with expert e) / (T*K)      # not differentiable
    P_e = (1/T) sum_t p_te                                            # carries the gradient

It is 1 under perfectly uniform routing; the layer adds ``aux_loss_coeff * L_balance`` (default 1e-2, the
Switch paper's alpha).

Topology-aware loss (TA-MoE, Chen et al., NeurIPS 2022, arXiv 2302.09915; code ``Chen-Chang/TA-MoE``,
``examples/language_model/moe/dygraph/moe/gate/gshard_gate.py``; ``../shared/reference/seeds.md`` §2.1).
TA-MoE re-weights each expert's term of the GShard loss by a per-destination topology weight, so that
the learnt dispatch approaches a target pattern ``c_hat`` that favours cheap destinations (the node's
own GPUs). The code computes ``mean_e(c_e * w_rank(e) * m_e) * n_local^2`` with
``w = softmax(topo_row) * W^2``; written with the caller's target proportions (``sum_e c_hat_e = 1``)
as the weight ``1 / c_hat_e`` (the reading of seeds.md §2.1, an inference: the paper's equations were
not available)::

    L_topo = sum_e f_e * P_e / c_hat_e - 1

- uniform ``c_hat = 1/E`` gives ``L_balance - 1``: the same gradient as the Switch loss;
- where the routed fractions follow the probabilities (f = P, what both losses drive towards),
  ``L_topo = sum_e (f_e - c_hat_e)^2 / c_hat_e``, the chi-square divergence of the dispatch from the
  target: 0 exactly when it matches, positive otherwise (Cauchy-Schwarz);
- ``dL/dP_e = f_e / c_hat_e`` lowers the probability of experts routed above their target share.

The ``- 1`` only moves the matched value to 0. Off f = P, like the Switch loss, the value may dip
below 0. TA-MoE uses it in place of the balance loss (set ``aux_loss_coeff=0`` to reproduce that); here
the layer adds ``topo_loss_coeff * L_topo`` once a target is set (``MoETransformer.set_topology_target``).
Both losses are computed on the tokens a rank routes; with expert parallelism each rank's f and P cover
its own tokens only, so they differ from the same losses on the whole batch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from planner.errors import SpecError
from planner.runtime.protocols import ExpertFn, TokenDispatcher
from planner.schema import ModelSpec

__all__ = [
    "MLP",
    "CausalSelfAttention",
    "LocalExperts",
    "MoELayer",
    "MoETransformer",
    "RMSNorm",
    "Router",
    "RuntimeModelConfig",
    "TransformerBlock",
    "causal_attention",
    "expert_parameters",
    "expert_range",
    "init_parameters",
    "load_balancing_loss",
    "load_full_state",
    "merge_ep_states",
    "rope_cos_sin",
    "shard_full_state",
    "topology_aware_loss",
]

Migration = Callable[[torch.Tensor, torch.Tensor, "MoELayer"], torch.Tensor]
"""Sequence migration of one MoE layer: (residual [B, S, H], its normed copy, the layer) -> the block's
output [B', S, H] for the sequences this rank holds from then on (``planner/runtime/migration.py``)."""

DispatcherFactory = Callable[[int], TokenDispatcher]
"""Builds the dispatcher of the MoE layer at a block index (0-based over all blocks)."""


@dataclass(frozen=True, kw_only=True)
class RuntimeModelConfig:
    """What the runtime builds: a GQA decoder whose FFNs after the first ``first_k_dense_layers`` are MoE."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_query_groups: int
    """Key/value heads; equal to ``num_heads`` for MHA. Divides ``num_heads``."""
    head_dim: int
    """Per-head dimension (``kv_channels``); even, for rotary embeddings."""
    ffn_hidden_size: int
    """FFN width of the dense layers."""
    num_experts: int
    moe_ffn_hidden_size: int
    """FFN width of one routed expert."""
    top_k: int
    vocab_size: int
    shared_expert_ffn_hidden_size: int = 0
    """Width of the shared expert added to every MoE layer's output; 0 for none."""
    first_k_dense_layers: int = 0
    gated: bool = True
    """SwiGLU FFNs (w1, w3, w2); false for a two-matrix GELU MLP (w1, w2)."""
    add_qkv_bias: bool = False
    norm_eps: float = 1e-5
    """RMSNorm epsilon (Megatron's ``--norm-epsilon`` default; ModelSpec does not carry it)."""
    rope_theta: float = 10000.0
    """Rotary base (ModelSpec does not carry it)."""
    aux_loss_coeff: float = 1e-2
    """Weight of the Switch load-balancing loss (Switch Transformer's alpha)."""
    topo_loss_coeff: float = 1e-2
    """Weight of the TA-MoE topology-aware loss; it applies only once a target is set."""
    init_std: float = 0.02
    """Std of the normal initialisation (Megatron's ``--init-method-std`` default); output projections
    use ``init_std / sqrt(2 * num_layers)`` (GPT-2, Megatron's scaled init)."""

    def __post_init__(self) -> None:
        sizes = {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "num_query_groups": self.num_query_groups,
            "head_dim": self.head_dim,
            "ffn_hidden_size": self.ffn_hidden_size,
            "num_experts": self.num_experts,
            "moe_ffn_hidden_size": self.moe_ffn_hidden_size,
            "top_k": self.top_k,
            "vocab_size": self.vocab_size,
        }
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} ({value}) must be positive")
        if self.num_heads % self.num_query_groups:
            raise ValueError(
                f"num_query_groups ({self.num_query_groups}) must divide num_heads ({self.num_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be at most num_experts ({self.num_experts})")
        if not 0 <= self.first_k_dense_layers < self.num_layers:
            raise ValueError(
                f"first_k_dense_layers ({self.first_k_dense_layers}) must be in "
                f"[0, num_layers ({self.num_layers}))"
            )
        if self.shared_expert_ffn_hidden_size < 0:
            raise ValueError(
                f"shared_expert_ffn_hidden_size ({self.shared_expert_ffn_hidden_size}) must be 0 or positive"
            )

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> RuntimeModelConfig:
        """The runtime model of a ModelSpec; a SpecError names every feature the runtime does not run.

        Fields ModelSpec does not carry (``norm_eps``, ``rope_theta``, the loss coefficients, ``init_std``)
        take their defaults; change them with ``dataclasses.replace``.
        """
        name = spec.name or "model"
        unsupported = []
        if spec.attention != "gqa":
            unsupported.append(f"attention is {spec.attention!r} (the runtime runs GQA/MHA attention only)")
        if spec.num_experts is None or spec.moe_router_topk is None:
            unsupported.append("num_experts is 0 (the runtime trains MoE models only)")
        if spec.moe_router_num_groups is not None:
            unsupported.append(
                f"moe_router_num_groups is {spec.moe_router_num_groups} "
                "(no group-limited routing in the runtime)"
            )
        if spec.mtp_num_layers:
            unsupported.append(
                f"mtp_num_layers is {spec.mtp_num_layers} (no multi-token prediction in the runtime)"
            )
        if not spec.untie_embeddings_and_output_weights:
            unsupported.append("untie_embeddings_and_output_weights is false (the runtime unties them)")
        if unsupported or spec.num_experts is None or spec.moe_router_topk is None:
            raise SpecError(f"{name}: the runtime cannot build this model: " + "; ".join(unsupported) + ".")
        return cls(
            num_layers=spec.num_layers,
            hidden_size=spec.hidden_size,
            num_heads=spec.num_attention_heads,
            num_query_groups=spec.query_groups,
            head_dim=spec.head_dim,
            ffn_hidden_size=spec.ffn_hidden_size,
            num_experts=spec.num_experts,
            moe_ffn_hidden_size=spec.expert_ffn_hidden_size,
            top_k=spec.moe_router_topk,
            vocab_size=spec.vocab_size,
            shared_expert_ffn_hidden_size=spec.shared_expert_ffn_hidden_size,
            first_k_dense_layers=spec.first_k_dense_layers,
            gated=spec.gated_linear_unit,
            add_qkv_bias=spec.add_qkv_bias,
        )


def expert_range(num_experts: int, ep_rank: int, ep_size: int) -> range:
    """Global ids of the experts that EP rank ``ep_rank`` of ``ep_size`` holds (a contiguous block)."""
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"ep_size ({ep_size}) must be positive and divide num_experts ({num_experts})")
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank ({ep_rank}) must be in [0, ep_size ({ep_size}))")
    per_rank = num_experts // ep_size
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


def _wide(x: torch.Tensor) -> torch.Tensor:
    # Norms, rotations, softmax and the loss run in float32 at least (float64 stays float64, so that a
    # float64 model can be checked against a reference to 1e-12).
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``, in float32 at least (Zhang & Sennrich, arXiv 1910.07467)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = _wide(x)
        normed = wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(wide.dtype)).to(x.dtype)


def rope_cos_sin(positions_S: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [S, D] of rotary embeddings (RoFormer, arXiv 2104.09864), half-split layout (Llama),
    at the sequence positions ``positions_S`` of the tokens (0..S-1 unless context parallelism splits
    the sequence)."""
    device = positions_S.device
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles_SD2 = torch.outer(positions_S.to(torch.float32), inv_freq)
    angles_SD = torch.cat((angles_SD2, angles_SD2), dim=-1)
    return angles_SD.cos(), angles_SD.sin()


def _apply_rope(x_BNSD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    first, second = x_BNSD.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    wide = _wide(x_BNSD)
    return (wide * cos_SD.to(wide.dtype) + _wide(rotated) * sin_SD.to(wide.dtype)).to(x_BNSD.dtype)


CoreAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""Causal attention of q [B, heads, S, D] over k, v [B, groups, S, D] -> [B, heads, S, D]."""


def causal_attention(
    q_BNSD: torch.Tensor, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor, mask_SK: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal attention; query head h reads key/value group h // (heads / groups), Megatron's and Hugging
    Face's order. Without ``mask_SK`` queries and keys are the same whole sequence; with it (True where a
    query may read a key) the keys may come from elsewhere (context parallelism)."""
    repeat = q_BNSD.shape[1] // k_BGSD.shape[1]
    if repeat > 1:
        k_BGSD, v_BGSD = k_BGSD.repeat_interleave(repeat, dim=1), v_BGSD.repeat_interleave(repeat, dim=1)
    if mask_SK is None:
        return F.scaled_dot_product_attention(q_BNSD, k_BGSD, v_BGSD, is_causal=True)
    return F.scaled_dot_product_attention(q_BNSD, k_BGSD, v_BGSD, attn_mask=mask_SK)


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention with grouped key/value heads (GQA; MHA when groups == heads) and RoPE."""

    core: CoreAttention | None = None
    """What attends when not :func:`causal_attention`: context parallelism, whose keys span ranks."""

    def __init__(self, config: RuntimeModelConfig) -> None:
        super().__init__()
        c = config
        self.head_dim = c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.add_qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_query_groups * c.head_dim, bias=c.add_qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_query_groups * c.head_dim, bias=c.add_qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x_BSH: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
        # Head counts come from the projection widths, not the config, so that a tensor-parallel caller can
        # shard q/k/v by columns and o by rows without touching this code. Explicit sizes, not -1: a rank
        # may hold no sequence at all (sequence migration).
        q, k, v = (self._heads(proj(x_BSH)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = _apply_rope(q, cos_SD, sin_SD), _apply_rope(k, cos_SD, sin_SD)
        out_BNSD = (self.core or causal_attention)(q, k, v)
        out: torch.Tensor = self.o_proj(out_BNSD.transpose(1, 2).flatten(2))
        return out

    def _heads(self, x_BSF: torch.Tensor) -> torch.Tensor:
        """[B, S, heads * D] -> [B, heads, S, D]."""
        batch, seq, width = x_BSF.shape
        return x_BSF.view(batch, seq, width // self.head_dim, self.head_dim).transpose(1, 2)


class MLP(nn.Module):
    """Dense FFN: SwiGLU ``w2(silu(w1 x) * w3 x)`` (Shazeer, arXiv 2002.05202) or ``w2(gelu(w1 x))``."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, gated: bool) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, ffn_hidden_size, bias=False) if gated else None
        self.w2 = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.w1(x)) * self.w3(x) if self.w3 is not None else F.gelu(self.w1(x))
        out: torch.Tensor = self.w2(h)
        return out


def _routed_fraction_E(expert_ids_TK: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    counts_E = torch.bincount(expert_ids_TK.reshape(-1), minlength=num_experts)
    return counts_E.to(dtype) / expert_ids_TK.numel()


TokenSum = Callable[[torch.Tensor], torch.Tensor]
"""Sums a statistic over the ranks that share a sequence (sequence parallelism), differentiably."""


def _routing_statistics(
    probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor, token_sum: TokenSum | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f_E, P_E): fraction of routed (token, expert) pairs per expert and mean router probability, over
    this rank's tokens or, with ``token_sum``, over every token of the ranks that share the sequence."""
    num_experts = probs_TE.shape[-1]
    if token_sum is None:
        return _routed_fraction_E(expert_ids_TK, num_experts, probs_TE.dtype), probs_TE.mean(dim=0)
    counts_E = torch.bincount(expert_ids_TK.reshape(-1), minlength=num_experts).to(probs_TE.dtype)
    tokens = torch.tensor([float(probs_TE.shape[0])], dtype=probs_TE.dtype, device=probs_TE.device)
    summed = token_sum(torch.cat([counts_E, probs_TE.sum(dim=0), tokens]))
    counts_E, prob_sums_E, total = summed[:num_experts], summed[num_experts:-1], summed[-1]
    return counts_E / (total * expert_ids_TK.shape[-1]), prob_sums_E / total


def load_balancing_loss(
    probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor, token_sum: TokenSum | None = None
) -> torch.Tensor:
    """Switch Transformer's ``E * sum_e f_e * P_e`` (arXiv 2101.03961 eq. 4), unscaled (module doc)."""
    f_E, P_E = _routing_statistics(probs_TE, expert_ids_TK, token_sum)
    return probs_TE.shape[-1] * torch.sum(f_E * P_E)


def topology_aware_loss(
    probs_TE: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    target_E: torch.Tensor,
    token_sum: TokenSum | None = None,
) -> torch.Tensor:
    """TA-MoE's ``sum_e f_e * P_e / c_hat_e - 1`` (arXiv 2302.09915), unscaled (see the module doc).

    ``target_E`` holds the target dispatch proportions ``c_hat`` (positive, summing to 1).
    """
    f_E, P_E = _routing_statistics(probs_TE, expert_ids_TK, token_sum)
    return torch.sum(f_E * P_E / target_E.to(probs_TE.dtype)) - 1


class Router(nn.Module):
    """Linear gate, softmax, top-k with renormalised weights, and the auxiliary losses (module doc)."""

    topology_target: torch.Tensor | None
    token_sum: TokenSum | None = None
    """Set under sequence parallelism: the losses' statistics cover all the sequence's tokens."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        aux_loss_coeff: float = 1e-2,
        topo_loss_coeff: float = 1e-2,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.aux_loss_coeff = aux_loss_coeff
        self.topo_loss_coeff = topo_loss_coeff
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        # Not persistent: the target depends on the rank's place in the cluster, not on the model.
        self.register_buffer("topology_target", None, persistent=False)

    def set_topology_target(self, target_E: torch.Tensor | None) -> None:
        """Target dispatch proportions ``c_hat`` [E] of the TA-MoE loss (normalised here); None: off."""
        if target_E is None:
            self.topology_target = None
            return
        if target_E.shape != (self.num_experts,) or not bool((target_E > 0).all()):
            raise ValueError(
                f"the topology target must be {self.num_experts} positive proportions, "
                f"got {target_E.tolist()}"
            )
        self.topology_target = (
            (target_E.double() / target_E.double().sum()).float().to(self.gate.weight.device)
        )

    def route(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x_TH`` -> ``probs_TE`` (float32 at least), ``expert_ids_TK`` (int64, global ids), ``weights_TK``
        (sum 1 per token, in ``x_TH``'s dtype)."""
        probs_TE = torch.softmax(_wide(self.gate(x_TH)), dim=-1)
        top_probs_TK, expert_ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        weights_TK = top_probs_TK / top_probs_TK.sum(dim=-1, keepdim=True)
        return probs_TE, expert_ids_TK, weights_TK.to(x_TH.dtype)

    def forward(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x_TH`` -> ``expert_ids_TK`` (int64, global ids), ``weights_TK`` (sum 1 per token), aux loss."""
        probs_TE, expert_ids_TK, weights_TK = self.route(x_TH)
        aux = self.aux_loss_coeff * load_balancing_loss(probs_TE, expert_ids_TK, self.token_sum)
        if self.topology_target is not None:
            aux = aux + self.topo_loss_coeff * topology_aware_loss(
                probs_TE, expert_ids_TK, self.topology_target, self.token_sum
            )
        return expert_ids_TK, weights_TK, aux


class LocalExperts(nn.Module):
    """A layer's experts ``experts`` (global ids) as stacked weights; an ``ExpertFn`` for dispatchers.

    Gated: ``w1``, ``w3`` [count, H, F] and ``w2`` [count, F, H]; ungated: ``w1`` and ``w2``. Dim 0 is the
    local expert: local expert i is global expert ``experts[i]``.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, experts: range, gated: bool) -> None:
        super().__init__()
        self.experts = experts
        count = len(experts)
        self.w1 = nn.Parameter(torch.empty(count, hidden_size, ffn_hidden_size))
        self.w3 = nn.Parameter(torch.empty(count, hidden_size, ffn_hidden_size)) if gated else None
        self.w2 = nn.Parameter(torch.empty(count, ffn_hidden_size, hidden_size))

    def forward(self, tokens_NH: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Rows grouped by local expert (``counts[i]`` rows for local expert i, in order) -> [N, H]."""
        if len(counts) != len(self.experts):
            raise ValueError(f"got {len(counts)} counts for {len(self.experts)} local experts")
        outputs = []
        for i, x in enumerate(torch.split(tokens_NH, list(counts))):
            h = x @ self.w1[i]
            h = F.silu(h) * (x @ self.w3[i]) if self.w3 is not None else F.gelu(h)
            outputs.append(h @ self.w2[i])
        return torch.cat(outputs)


class _LocalDispatcher:
    """The ep=1 dispatcher: group the (token, expert) pairs by expert, run them, weighted scatter-add."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def __call__(
        self, tokens: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, experts: ExpertFn
    ) -> torch.Tensor:
        top_k = expert_ids.shape[1]
        flat_ids_N = expert_ids.reshape(-1)
        # Stable, so rows of one expert keep token order (deterministic sums in the scatter-add).
        order_N = torch.argsort(flat_ids_N, stable=True)
        token_of_N = order_N // top_k
        # NOTE: a device-to-host sync; the split sizes of the expert GEMMs must be known on the host.
        counts: list[int] = torch.bincount(flat_ids_N, minlength=self.num_experts).tolist()
        out_NH = experts(tokens[token_of_N], counts)
        out_NH = out_NH * weights.reshape(-1)[order_N].unsqueeze(-1).to(out_NH.dtype)
        return tokens.new_zeros(tokens.shape).index_add(0, token_of_N, out_NH)


class MoELayer(nn.Module):
    """Router, this rank's experts, an optional shared expert, and the dispatcher that connects them."""

    def __init__(self, config: RuntimeModelConfig, experts: range, dispatcher: TokenDispatcher) -> None:
        super().__init__()
        c = config
        self.router = Router(c.hidden_size, c.num_experts, c.top_k, c.aux_loss_coeff, c.topo_loss_coeff)
        self.experts = LocalExperts(c.hidden_size, c.moe_ffn_hidden_size, experts, c.gated)
        self.shared_expert = (
            MLP(c.hidden_size, c.shared_expert_ffn_hidden_size, c.gated)
            if c.shared_expert_ffn_hidden_size
            else None
        )
        self.dispatcher = dispatcher
        self.expert_fn: ExpertFn | None = None
        """What runs the experts when not ``experts`` itself (expert tensor parallelism wraps them)."""
        self.migration: Migration | None = None
        """Set for Luffy's sequence migration: the layer then also decides where each sequence goes on."""
        self.last_aux_loss: torch.Tensor | None = None
        """Weighted auxiliary loss of the last forward (balance, plus topology when a target is set)."""

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        x_TH = x_BSH.reshape(-1, x_BSH.shape[-1])
        expert_ids_TK, weights_TK, self.last_aux_loss = self.router(x_TH)
        out_TH = self.dispatcher(x_TH, expert_ids_TK, weights_TK, self.expert_fn or self.experts)
        if self.shared_expert is not None:
            out_TH = out_TH + self.shared_expert(x_TH)
        return out_TH.view_as(x_BSH)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attention(norm(x))``, then ``x + ffn(norm(x))`` with a dense or MoE FFN."""

    def __init__(self, config: RuntimeModelConfig, ffn: MLP | MoELayer) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attention = CausalSelfAttention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.ffn = ffn

    def forward(self, x_BSH: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
        x_BSH = x_BSH + self.attention(self.attention_norm(x_BSH), cos_SD, sin_SD)
        if isinstance(self.ffn, MoELayer) and self.ffn.migration is not None:
            # The residual sum happens wherever each sequence continues: the migration returns the
            # block's output for the sequences this rank holds next (a different batch).
            return self.ffn.migration(x_BSH, self.ffn_norm(x_BSH), self.ffn)
        out: torch.Tensor = x_BSH + self.ffn(self.ffn_norm(x_BSH))
        return out


class MoETransformer(nn.Module):
    """Embedding, ``first_k_dense_layers`` dense blocks then MoE blocks, final RMSNorm, untied LM head.

    With ``ep_size > 1`` each MoE layer holds experts ``expert_range(E, ep_rank, ep_size)`` and
    ``dispatcher_factory(block_index)`` builds its dispatcher; without a factory the layers use a local
    dispatcher, which needs ``ep_size == 1``. Parameters are uninitialised: call ``init_parameters``.
    """

    def __init__(
        self,
        config: RuntimeModelConfig,
        ep_rank: int = 0,
        ep_size: int = 1,
        dispatcher_factory: DispatcherFactory | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.ep_rank, self.ep_size = ep_rank, ep_size
        local_experts = expert_range(config.num_experts, ep_rank, ep_size)
        if dispatcher_factory is None and ep_size != 1:
            raise ValueError(f"ep_size is {ep_size}: expert parallelism needs a dispatcher_factory")
        blocks = []
        for index in range(config.num_layers):
            ffn: MLP | MoELayer
            if index < config.first_k_dense_layers:
                ffn = MLP(config.hidden_size, config.ffn_hidden_size, config.gated)
            else:
                dispatcher = (
                    dispatcher_factory(index)
                    if dispatcher_factory is not None
                    else _LocalDispatcher(config.num_experts)
                )
                ffn = MoELayer(config, local_experts, dispatcher)
            blocks.append(TransformerBlock(config, ffn))
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(blocks)
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.sequence_positions: torch.Tensor | None = None
        """Positions in the sequence of the tokens this rank holds, when context parallelism gives it a
        part of each sequence; None: the whole sequence, 0..S-1."""

    def rope_tables(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary cos and sin of the ``seq_len`` tokens the attention layers of this rank see."""
        positions = self.sequence_positions
        if positions is None:
            positions = torch.arange(seq_len, device=device)
        elif positions.numel() != seq_len:
            raise ValueError(f"this rank holds {positions.numel()} positions of each sequence, not {seq_len}")
        return rope_cos_sin(positions.to(device), self.config.head_dim, self.config.rope_theta)

    def forward(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        """Token ids [B, S] -> logits [B, S, V]."""
        h_BSH = self.embedding(input_ids_BS)
        cos_SD, sin_SD = self.rope_tables(input_ids_BS.shape[1], input_ids_BS.device)
        for block in self.layers:
            h_BSH = block(h_BSH, cos_SD, sin_SD)
        logits_BSV: torch.Tensor = self.lm_head(self.norm(h_BSH))
        return logits_BSV

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers, in block order."""
        return [module for module in self.modules() if isinstance(module, MoELayer)]

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' weighted auxiliary losses from the last forward."""
        losses = [layer.last_aux_loss for layer in self.moe_layers() if layer.last_aux_loss is not None]
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.lm_head.weight.device)

    def loss(self, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross entropy + auxiliary losses, auxiliary losses).

        ``labels_BS[b, s]`` is the target of position s (already shifted, as Megatron's and torchtitan's
        data loaders give it); -100 marks positions to ignore.
        """
        logits_BSV = self(input_ids_BS)
        cross_entropy = F.cross_entropy(
            _wide(logits_BSV.flatten(0, 1)), labels_BS.flatten(), ignore_index=-100
        )
        aux = self.aux_loss()
        return cross_entropy + aux, aux

    def set_topology_target(self, target_E: torch.Tensor | None) -> None:
        """Set (or with None clear) the TA-MoE target proportions of every MoE layer's router."""
        for layer in self.moe_layers():
            layer.router.set_topology_target(target_E)


def _generator(seed: int, key: str) -> torch.Generator:
    # A stable 63-bit seed per (seed, parameter or expert) so that every tensor's values depend on its
    # name alone: not on the parameter order, the expert placement or the device.
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _normal(shape: torch.Size, std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32) * std


_OUTPUT_PROJECTIONS = ("o_proj", "w2")
"""Parameters whose output is added to the residual stream: initialised with the scaled std."""


def init_parameters(model: MoETransformer, seed: int) -> None:
    """Initialise every parameter from ``seed``, identically whatever ``ep_rank`` and ``ep_size`` are.

    Norm weights 1, biases 0, other weights ``N(0, init_std^2)``, output projections (``o_proj``, ``w2``)
    ``N(0, (init_std / sqrt(2 L))^2)``. Each non-expert parameter draws from a generator keyed by its
    name, each routed expert from one keyed by ``(layer, global expert id)``, on the CPU, so that every
    rank and every expert placement gets the same values. Call it before sharding parameters further.
    """
    std = model.config.init_std
    output_std = std / math.sqrt(2 * model.config.num_layers)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if isinstance(module, LocalExperts):
                for local, expert in enumerate(module.experts):
                    generator = _generator(seed, f"{module_name}.{expert}")
                    for name, param in module.named_parameters(recurse=False):
                        param_std = output_std if name in _OUTPUT_PROJECTIONS else std
                        param[local].copy_(_normal(param.shape[1:], param_std, generator))
                continue
            for name, param in module.named_parameters(recurse=False):
                if isinstance(module, RMSNorm):
                    param.fill_(1.0)
                elif name == "bias":
                    param.zero_()
                else:
                    last = module_name.rsplit(".", 1)[-1]
                    param_std = output_std if last in _OUTPUT_PROJECTIONS else std
                    param.copy_(_normal(param.shape, param_std, _generator(seed, f"{module_name}.{name}")))


def expert_parameters(model: nn.Module) -> dict[str, range]:
    """Name of every routed-expert parameter -> the global expert ids along its dim 0."""
    return {
        f"{module_name}.{name}": module.experts
        for module_name, module in model.named_modules()
        if isinstance(module, LocalExperts)
        for name, _ in module.named_parameters(recurse=False)
    }


def shard_full_state(model: nn.Module, full_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The part of a full (ep=1) state dict, or of any name -> tensor map such as gradients, that
    ``model`` holds: expert tensors sliced to its experts, everything else as is."""
    experts = expert_parameters(model)
    return {
        name: tensor[experts[name].start : experts[name].stop] if name in experts else tensor
        for name, tensor in full_state.items()
    }


def load_full_state(model: nn.Module, full_state: Mapping[str, torch.Tensor]) -> None:
    """Load a full (ep=1) model's state dict into an EP-sharded ``model`` (strict: every key must match)."""
    model.load_state_dict(shard_full_state(model, full_state), strict=True)


def merge_ep_states(
    states: Sequence[Mapping[str, torch.Tensor]], expert_names: Iterable[str]
) -> dict[str, torch.Tensor]:
    """The full (ep=1) state from the states of EP ranks 0..ep-1 (in rank order).

    Expert tensors (``expert_names``, e.g. ``expert_parameters(model)``) are concatenated along dim 0; the
    rest is taken from rank 0.
    """
    names = set(expert_names)
    return {
        name: torch.cat([state[name] for state in states]) if name in names else tensor
        for name, tensor in states[0].items()
    }
