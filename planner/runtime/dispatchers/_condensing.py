"""Luffy token condensation around any dispatcher (Chen et al., arXiv 2411.15419 §4.2; seeds.md §4.2).

Among the pairs of one expert, a token whose cosine similarity to an earlier kept token of that expert
exceeds the threshold is not sent; it reuses the expert output of its most similar representative.
Bytes scale by the kept fraction. Model-altering (an approximation), opt-in.
"""

from __future__ import annotations

import torch
from torch import Tensor

from planner.runtime.dispatchers._routing import weighted_sum
from planner.runtime.protocols import ExpertFn, TokenDispatcher

__all__ = ["Condensing"]


class Condensing:
    """Luffy token condensation around any dispatcher: near-duplicate tokens of an expert are sent once.

    Among the pairs routed to one expert (in token order), a pair whose token has cosine similarity
    ``> threshold`` to an earlier *kept* token of that expert is condensed: it is not sent, and its
    output is the most similar representative's expert output times its own weight. The kept pairs go
    to ``inner`` as single-expert rows (K = 1, weight 1) so that each representative's unweighted output
    comes back on its own; the weighting happens here. Consequences: under the hierarchical dispatcher
    (``hierarchical.py``) the kept pairs of one token are no longer node-deduplicated, and an inner
    capacity factor applies to the kept rows. Gradients follow the condensed computation (a
    condensed token gets no gradient through its condensed pairs; its representative does).

    With ``threshold >= 1`` nothing can be condensed (cosine similarity is at most 1, clamped against
    rounding) and the call is exactly ``inner(...)``. Similarities are computed on this rank's tokens only
    (O(n^2) per expert, greedy on the host): meant for small models and traffic experiments.

    Attributes
    ----------
    num_pairs, num_condensed
        (token, expert) pairs in the last call, and how many of them were condensed.
    condensed_fraction
        ``num_condensed / num_pairs`` (0 before the first call).
    """

    def __init__(self, inner: TokenDispatcher, threshold: float) -> None:
        self.inner = inner
        self.threshold = threshold
        self.num_pairs = 0
        self.num_condensed = 0

    @property
    def condensed_fraction(self) -> float:
        return self.num_condensed / self.num_pairs if self.num_pairs else 0.0

    def __call__(self, tokens: Tensor, expert_ids: Tensor, weights: Tensor, experts: ExpertFn) -> Tensor:
        self.num_pairs = expert_ids.numel()
        if self.threshold >= 1.0:
            self.num_condensed = 0
            return self.inner(tokens, expert_ids, weights, experts)
        k = expert_ids.shape[1]
        representative = self._representatives(tokens.detach(), expert_ids)
        pairs = torch.arange(expert_ids.numel(), device=expert_ids.device)
        is_kept = representative == pairs
        kept = is_kept.nonzero().squeeze(1)
        self.num_condensed = self.num_pairs - kept.numel()
        slot_of_kept = torch.cumsum(is_kept.long(), 0) - 1
        y = self.inner(
            tokens.index_select(0, kept // k),
            expert_ids.reshape(-1)[kept].unsqueeze(1),
            torch.ones((kept.numel(), 1), dtype=weights.dtype, device=weights.device),
            experts,
        )
        rows = y.index_select(0, slot_of_kept[representative])
        return weighted_sum(rows, pairs // k, weights.reshape(-1), tokens.shape[0])

    def _representatives(self, tokens: Tensor, expert_ids: Tensor) -> Tensor:
        """[T*K] the flat pair index whose expert output each pair uses (itself when kept)."""
        k = expert_ids.shape[1]
        flat = expert_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        unit = torch.nn.functional.normalize(tokens.float(), dim=-1).index_select(0, order // k)
        _, counts = torch.unique_consecutive(flat[order], return_counts=True)
        representative = torch.arange(flat.numel())
        order_host = order.tolist()
        start = 0
        for n in counts.tolist():
            block = unit[start : start + n]
            sims = (block @ block.t()).clamp(-1.0, 1.0).tolist()  # one host copy per expert
            kept: list[int] = []
            for i, row in enumerate(sims):
                best = max(kept, key=row.__getitem__, default=None)
                if best is not None and row[best] > self.threshold:
                    representative[order_host[start + i]] = order_host[start + best]
                else:
                    kept.append(i)
            start += n
        return representative.to(flat.device)
