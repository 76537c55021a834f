"""The runtime's MoE layer: router, auxiliary losses, this rank's experts and the dispatcher between them.

Shape legend as in ``model.py``.

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

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from planner.runtime.layers import MLP, to_wide
from planner.runtime.model_config import RuntimeModelConfig
from planner.runtime.protocols import ExpertFn, TokenDispatcher

__all__ = [
    "LocalExperts",
    "Migration",
    "MoELayer",
    "Router",
    "TokenSum",
    "load_balancing_loss",
    "topology_aware_loss",
]

Migration = Callable[[torch.Tensor, torch.Tensor, "MoELayer"], torch.Tensor]
"""Sequence migration of one MoE layer: (residual [B, S, H], its normed copy, the layer) -> the block's
output [B', S, H] for the sequences this rank holds from then on (``planner/runtime/migration.py``)."""


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
        probs_TE = torch.softmax(to_wide(self.gate(x_TH)), dim=-1)
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
