"""Routing bookkeeping shared by the dispatcher kinds: capacity, permutations, the weighted sum, and the
flat all-to-all's plan (which rows go to which member, and how the received rows group by local expert).

Placement. An EP group of P members holds E experts, ``L = E / P`` per member: expert ``e`` is local
expert ``e % L`` of member ``e // L``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from planner.runtime.dispatchers._collectives import Comm, exchange_counts
from planner.runtime.protocols import ExpertFn

__all__ = [
    "FlatPlan",
    "capacity_keep_mask",
    "check_experts",
    "flat_plan",
    "inverse",
    "run_experts",
    "weighted_sum",
]


def capacity_keep_mask(expert_ids: Tensor, num_experts: int, capacity_factor: float) -> Tensor:
    """Which of the T*K pairs (flattened token-major) fit their expert's capacity on this rank.

    ``capacity = ceil(capacity_factor * T*K / E)``; within each expert the first pairs in token order are
    kept (the "position" drop policy of Megatron-Core's ``moe_utils``).
    """
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor ({capacity_factor}) must be > 0")
    flat = expert_ids.reshape(-1)
    capacity = math.ceil(capacity_factor * flat.numel() / num_experts)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(flat)
    position[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    return position < capacity


def inverse(order: Tensor) -> Tensor:
    """The inverse permutation of ``order``."""
    result = torch.empty_like(order)
    result[order] = torch.arange(order.numel(), device=order.device)
    return result


def weighted_sum(rows: Tensor, index: Tensor, weights: Tensor | None, num_rows: int) -> Tensor:
    """``out[index[i]] += weights[i] * rows[i]`` into ``num_rows`` rows, accumulated in the wider dtype."""
    acc = rows.dtype if weights is None else torch.promote_types(rows.dtype, weights.dtype)
    terms = rows.to(acc) if weights is None else rows.to(acc) * weights.to(acc).unsqueeze(-1)
    out = rows.new_zeros((num_rows, *rows.shape[1:]), dtype=acc).index_add(0, index, terms)
    return out.to(rows.dtype)


def check_experts(num_experts: int, ep: int) -> int:
    """L = E / P, the experts per EP member (ValueError unless P divides E)."""
    if num_experts % ep:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by the EP group size ({ep})")
    return num_experts // ep


@dataclass(frozen=True)
class FlatPlan:
    """The flat all-to-all's bookkeeping for one call (S sent rows, R received rows)."""

    pair_index: Tensor
    """[S] flat pair index ``t*K + j`` of each sent row, in send order (member, chunk, local expert)."""
    token_index: Tensor
    """[S] token of each sent row."""
    send_counts: list[list[list[int]]]
    """[P][C][L] rows sent to (member, chunk, local expert)."""
    recv_counts: list[list[list[int]]]
    """[P][C][L] rows received from (member, chunk, local expert)."""
    expert_order: Tensor
    """[R] permutation grouping the received rows by local expert (source order kept within)."""
    expert_counts: list[int]
    """[L] received rows per local expert."""

    @property
    def send_rows(self) -> list[int]:
        return [sum(sum(chunk) for chunk in member) for member in self.send_counts]

    @property
    def recv_rows(self) -> list[int]:
        return [sum(sum(chunk) for chunk in member) for member in self.recv_counts]


def flat_plan(
    expert_ids: Tensor,
    keep: Tensor | None,
    chunk_of_token: Tensor | None,
    num_chunks: int,
    num_local: int,
    comm: Comm,
) -> FlatPlan:
    """Sort this rank's (token, expert) pairs by (member, chunk, local expert), exchange the counts (kind
    ``counts``) and group the rows to be received by local expert. ``keep``: the pairs that are sent
    (capacity), all when None; ``chunk_of_token``: each token's chunk (MoNTA), all in chunk 0 when None."""
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)
    if keep is None:
        pair = torch.arange(flat.numel(), device=flat.device)
    else:
        pair = keep.nonzero().squeeze(1)  # a device->host sync on GPUs; the splits need one anyway
    expert = flat[pair]
    member, local = expert // num_local, expert % num_local
    chunk = torch.zeros_like(pair) if chunk_of_token is None else chunk_of_token[pair // k]
    key = (member * num_chunks + chunk) * num_local + local
    order = torch.argsort(key, stable=True)
    pair = pair[order]
    counts = torch.bincount(key, minlength=comm.size * num_chunks * num_local)
    counts = counts.view(comm.size, num_chunks, num_local)
    recv = exchange_counts(counts, comm)
    # The one device->host copy of the call: all-to-all split sizes are host ints on gloo and NCCL.
    send_counts, recv_counts = counts.tolist(), recv.tolist()
    recv_flat = recv.reshape(-1)
    labels = torch.arange(recv_flat.numel(), device=flat.device)
    row_local = torch.repeat_interleave(
        labels, recv_flat, output_size=sum(n for member in recv_counts for chunk in member for n in chunk)
    )
    row_local = row_local % num_local
    return FlatPlan(
        pair_index=pair,
        token_index=pair // k,
        send_counts=send_counts,
        recv_counts=recv_counts,
        expert_order=torch.argsort(row_local, stable=True),
        expert_counts=recv.sum((0, 1)).tolist(),
    )


def run_experts(x_recv: Tensor, plan: FlatPlan, experts: ExpertFn) -> Tensor:
    """Received rows -> grouped by local expert -> experts -> back in received order."""
    y = experts(x_recv.index_select(0, plan.expert_order), plan.expert_counts)
    return y.index_select(0, inverse(plan.expert_order))
