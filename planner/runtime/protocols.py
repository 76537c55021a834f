"""The contracts between the runtime's model and its token dispatchers.

A MoE layer routes each of its T local tokens to k experts (global expert ids) with combine weights.
A dispatcher moves the tokens to the ranks that hold those experts, runs them through the rank's
local experts, brings the results back and combines them:

    out[t] = sum_j weights[t, j] * expert[expert_ids[t, j]](tokens[t])

The expert computation is the caller's (``ExpertFn``): it takes the tokens for this rank's experts
grouped by local expert (``counts[i]`` rows for local expert i, in order) and returns their outputs in
the same order. Every step is autograd-differentiable: gradients reach the tokens, the weights and the
expert parameters exactly as a single-process computation would give them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

__all__ = ["ExpertFn", "TokenDispatcher"]


class ExpertFn(Protocol):
    """This rank's experts: rows grouped by local expert (``counts`` rows each, in order) -> outputs."""

    def __call__(self, tokens: torch.Tensor, counts: Sequence[int]) -> torch.Tensor: ...


class TokenDispatcher(Protocol):
    """Dispatch, expert computation and combine for one MoE layer call."""

    def __call__(
        self, tokens: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, experts: ExpertFn
    ) -> torch.Tensor:
        """``tokens`` [T, H], ``expert_ids`` [T, k] (int64, global ids), ``weights`` [T, k] -> [T, H]."""
        ...
