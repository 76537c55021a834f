"""The one-process dispatcher (EP = 1): the reference every distributed kind must match.

Sort the T*K (token, expert) pairs by expert, run the experts, weight, scatter-add. No communication.
The model's MoE layers use it when no dispatcher factory is given, and every kind's factory returns it
when the EP group has one member (except MoNTA, which still removes the TP duplicates then).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from planner.runtime.dispatchers._routing import capacity_keep_mask, weighted_sum
from planner.runtime.protocols import ExpertFn, TokenDispatcher

__all__ = ["LocalDispatcher", "local_factory"]


class LocalDispatcher:
    """All experts in this process (EP = 1): the reference every distributed dispatcher must match.

    Parameters
    ----------
    num_experts
        E; ``experts`` receives ``counts`` of length E.
    capacity_factor
        ``None`` for dropless; otherwise pairs beyond ``ceil(capacity_factor * T*K / E)`` per expert are
        dropped (:func:`~planner.runtime.dispatchers._routing.capacity_keep_mask`).
    """

    def __init__(self, num_experts: int, capacity_factor: float | None = None) -> None:
        if num_experts < 1:
            raise ValueError(f"num_experts ({num_experts}) must be >= 1")
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor

    def __call__(self, tokens: Tensor, expert_ids: Tensor, weights: Tensor, experts: ExpertFn) -> Tensor:
        k = expert_ids.shape[1]
        flat = expert_ids.reshape(-1)
        if self.capacity_factor is None:
            pair = torch.arange(flat.numel(), device=flat.device)
        else:
            pair = capacity_keep_mask(expert_ids, self.num_experts, self.capacity_factor).nonzero().squeeze(1)
        # Stable, so rows of one expert keep token order (deterministic sums in the scatter-add).
        pair = pair[torch.argsort(flat[pair], stable=True)]
        # NOTE: a device-to-host sync; the split sizes of the expert GEMMs must be known on the host.
        counts = torch.bincount(flat[pair], minlength=self.num_experts).tolist()
        token = pair // k
        y = experts(tokens.index_select(0, token), counts)
        return weighted_sum(y, token, weights.reshape(-1)[pair], tokens.shape[0])


def local_factory(num_experts: int) -> Callable[[int], TokenDispatcher]:
    """A per-layer builder of :class:`LocalDispatcher` (what a kind runs with an EP group of one)."""

    def build(_layer: int) -> TokenDispatcher:
        return LocalDispatcher(num_experts)

    return build
