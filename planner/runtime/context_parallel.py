"""Context parallelism: each rank of a CP group holds a part of every sequence (Megatron-Core's CP).

Split (Megatron-Core ``megatron/core/utils.py``, ``get_batch_on_this_cp_rank``): the sequence is cut
into ``2 cp`` equal chunks and CP rank ``r`` holds chunks ``r`` and ``2 cp - 1 - r``, so that under the
causal mask every rank has the same attention work (an early chunk with few keys paired with a late one
with many). Token ids, labels and rotary positions are those of the rank's chunks; everything but
attention is per token and runs on the rank's tokens as it would on the whole sequence.

Attention needs every earlier key of the sequence. Each layer all-gathers the rank's keys and values
(grouped heads, after RoPE: the smaller tensors) over the CP group and attends its queries to all of
them, with the causal mask written from the tokens' positions (``key position <= query position``).
The forward keeps only the rank's own keys and values; the backward gathers them again, recomputes the
attention and reduce-scatters the key/value gradients back to the ranks that own them. That is the
traffic of Megatron's default ring (``--cp-comm-type p2p``, Liu et al., Ring Attention, arXiv
2310.01889), which the cost model prices (``planner/costmodel/estimate.py``, ``_cp_comm``): per rank and
layer, ``(cp - 1)`` times the rank's key/value bytes in the forward and twice that in the backward
(``cp_kv_all_gather`` counts the two gathers, ``cp_kv_reduce_scatter`` the gradients). The ring overlaps
each hop with a block of attention; here each collective runs before or after the attention, which
changes the time, not the bytes.

Losses and gradients. A rank's cross entropy is the mean over its tokens; scaled by ``1 / cp`` the CP
ranks' losses add up to the mean over the sequence, so the caller scales the loss by ``1 / cp`` and sums
dense gradients over the data-parallel and CP ranks together (Megatron's ``dp_cp`` group). Routed
experts need nothing more: CP is folded into the expert data-parallel group. The router's auxiliary
losses use statistics summed over every rank that holds tokens of the same sequences (the CP group, and
the TP group with sequence parallelism: Megatron's ``tp_cp`` group), so they equal the one-device losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from planner.runtime.meter import TrafficMeter
from planner.runtime.model import CausalSelfAttention, MoETransformer, causal_attention
from planner.runtime.tensor_parallel import GroupRing, summed_over

__all__ = ["ContextShard", "context_positions", "shard_context_parallel"]


def context_positions(seq_len: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Positions of the tokens CP rank ``cp_rank`` holds: chunks ``r`` and ``2 cp - 1 - r`` of ``2 cp``."""
    if seq_len % (2 * cp_size):
        raise ValueError(f"seq_len ({seq_len}) must be a multiple of 2 x cp = {2 * cp_size}")
    chunk = seq_len // (2 * cp_size)
    first, second = cp_rank, 2 * cp_size - 1 - cp_rank
    return torch.cat(
        [torch.arange(first * chunk, (first + 1) * chunk), torch.arange(second * chunk, (second + 1) * chunk)]
    )


class ContextShard:
    """One rank's place in its CP group: its token positions, every rank's, and the group's ring."""

    def __init__(self, seq_len: int, ranks: Sequence[int], ring: GroupRing) -> None:
        size, me = len(ranks), list(ranks).index(dist.get_rank())
        self.positions = context_positions(seq_len, me, size)
        # The gathered keys come in group rank order, each rank's chunks as it holds them.
        key_positions = torch.cat([context_positions(seq_len, r, size) for r in range(size)])
        self.mask = key_positions.unsqueeze(0) <= self.positions.unsqueeze(1)
        """[rank's S, whole S]: True where a query may read a key (causal, by position)."""
        self.ring = ring

    def chunk(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of a [B, S] batch of whole sequences."""
        return tokens_BS.index_select(1, self.positions.to(tokens_BS.device)).contiguous()

    def gather_kv(self, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every CP rank's keys and values, joined along the sequence (one collective for both)."""
        both = self.ring.all_gather(torch.cat([k_BGSD, v_BGSD], dim=1), dim=-2)
        k, v = torch.split(both, [k_BGSD.shape[1], v_BGSD.shape[1]], dim=1)
        return k, v

    def attention(self, q_BNSD: torch.Tensor, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor) -> torch.Tensor:
        """A ``CoreAttention``: this rank's queries over the whole sequence's keys (module doc)."""
        out: torch.Tensor = _GatheredAttention.apply(q_BNSD, k_BGSD, v_BGSD, self)  # type: ignore[no-untyped-call]
        return out


class _GatheredAttention(torch.autograd.Function):
    """Attention over keys and values gathered from the CP group; backward gathers them again."""

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shard: ContextShard
    ) -> torch.Tensor:
        ctx.save_for_backward(q, k, v)
        ctx.shard = shard
        k_all, v_all = shard.gather_kv(k, v)
        return causal_attention(q, k_all, v_all, shard.mask.to(q.device))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, k, v = ctx.saved_tensors
        shard: ContextShard = ctx.shard
        k_all, v_all = shard.gather_kv(k, v)  # the forward kept only this rank's share
        with torch.enable_grad():
            q_leaf = q.detach().requires_grad_()
            k_leaf, v_leaf = k_all.detach().requires_grad_(), v_all.detach().requires_grad_()
            out = causal_attention(q_leaf, k_leaf, v_leaf, shard.mask.to(q.device))
            grad_q, grad_k_all, grad_v_all = torch.autograd.grad(out, (q_leaf, k_leaf, v_leaf), grad_out)
        groups = k.shape[1]
        summed = shard.ring.reduce_scatter(torch.cat([grad_k_all, grad_v_all], dim=1), dim=-2)
        grad_k, grad_v = torch.split(summed, [groups, summed.shape[1] - groups], dim=1)
        return grad_q, grad_k, grad_v, None


def shard_context_parallel(
    model: MoETransformer,
    seq_len: int,
    group: dist.ProcessGroup,
    ranks: Sequence[int],
    token_group: tuple[dist.ProcessGroup, Sequence[int]],
    meter: TrafficMeter | None = None,
) -> ContextShard | None:
    """Give ``model`` this rank's part of each ``seq_len``-token sequence of the CP group ``ranks``
    (None when the group has one rank).

    ``token_group`` is the group whose ranks hold different tokens of the same sequences (CP, or TP x CP
    under sequence parallelism): the routers sum their statistics over it. Call after
    ``shard_tensor_parallel``, whose routers' sums over TP this replaces.
    """
    if len(ranks) == 1:
        return None
    ring = GroupRing(group, ranks, meter, gather_kind="cp_kv_all_gather", scatter_kind="cp_kv_reduce_scatter")
    shard = ContextShard(seq_len, ranks, ring)
    model.sequence_positions = shard.positions
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            module.core = shard.attention
    token_ring = GroupRing(token_group[0], token_group[1], meter)
    for layer in model.moe_layers():
        layer.router.token_sum = summed_over(token_ring)
    return shard
