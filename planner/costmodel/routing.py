"""MoE dispatch/combine volume: copies of a token's hidden vector that cross each link class.

Notation (``../shared/reference/seeds.md`` §6.0): P ranks in the EP group over N nodes with r = P/N
ranks per node; E experts, k per token, placed contiguously (E/P per rank); H hidden; b bytes.

Expected distinct targets under top-k routing, exact for uniform routing without replacement
(seeds §6.2): a set holding e of the E experts is hit with probability ``1 - C(E-e, k)/C(E, k)``; with
group-limited routing (g of R expert groups, then k experts among the chosen groups' experts) the
chosen groups are drawn first (hypergeometric) and the k experts among their g*E/R experts.
``D(X)`` = X x P(one of X equal sets is hit). Worked value: E=256, k=8, X=8 gives D=5.2947 (seeds).

Copies per source token, one direction, by dispatcher (the combine moves the same rows back):
- ``alltoall`` (flat NCCL, one copy per (token, expert)): k copies; a fraction (P-r)/P leave the
  node, (r-1)/P stay on NVLink, 1/P are local. Capacity padding (DeepSpeed's layout) multiplies k by
  the capacity factor; without SP each of the t TP ranks sends the same tokens (t duplicates).
- ``hierarchical`` (DeepEP / Hybrid-EP): one copy per distinct remote node, ``D(N) - p_n`` (p_n =
  P(own node hit)), on the scale-out link; in the node, one copy per distinct target rank other than
  self, including forwarding on the receiving node: ``D(P) - N*p_r`` (p_r = P(a rank is hit)).
- ``monta``: TP-deduplicated all-to-all (each TP rank sends only its 1/t share of the duplicated tokens,
  flat volumes) plus an intra-node all-gather over TP that rebuilds the full set: each rank receives the
  other t-1 ranks' routed copies (MoNTA, seeds §1.1).
Copies are counted per token of a rank's 1/t share of its TP group's sequence (``tokens / tp``): the
duplicated baseline sends t times its share.
- ``allgather``: every rank gathers all tokens of the EP x TP group: (P*t - 1) copies per token, split
  by where the other ranks live.
Topology-aware routing (TA-MoE, seeds §2.2/§6.6) moves the split of the k copies between the node and
the rest so that both links finish together: remote fraction ``B_inter*(P-r)/(B_intra*(r-1) + B_inter*(P-r))``
of the non-local copies instead of ``(P-r)/(P-1)``. Condensation (Luffy) multiplies every copy by (1 - rho).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from math import comb

__all__ = [
    "DispatchCopies",
    "dispatch_copies",
    "expected_distinct",
    "expected_max_normal",
    "migration_saved_fraction",
    "p_hit",
    "topology_aware_remote_fraction",
]


def p_hit(
    num_experts: int, topk: int, experts_in_set: int, num_groups: int = 1, group_topk: int = 1
) -> float:
    """Probability that a token routes to at least one of ``experts_in_set`` contiguous experts.

    Groups of ``num_experts / num_groups`` contiguous experts; ``group_topk`` groups are chosen
    uniformly, then ``topk`` experts uniformly among them. Without group routing pass 1 and 1.
    """
    e, k = num_experts, topk
    if num_groups <= 1:
        return 1.0 - comb(e - experts_in_set, k) / comb(e, k)
    per_group = e // num_groups
    pool = group_topk * per_group  # experts a token may choose from once its groups are chosen
    if experts_in_set >= per_group:
        # The set holds whole groups: j of its x groups are chosen (hypergeometric), then k of the pool.
        x = experts_in_set // per_group
        miss = 0.0
        for j in range(0, min(x, group_topk) + 1):
            p_j = comb(x, j) * comb(num_groups - x, group_topk - j) / comb(num_groups, group_topk)
            miss += p_j * comb(pool - j * per_group, k) / comb(pool, k)
        return 1.0 - miss
    # The set lies inside one group: that group must be chosen, then one of the set's experts.
    chosen = group_topk / num_groups
    return chosen * (1.0 - comb(pool - experts_in_set, k) / comb(pool, k))


def expected_distinct(
    num_sets: int, num_experts: int, topk: int, num_groups: int = 1, group_topk: int = 1
) -> float:
    """Expected distinct sets hit by one token when the experts are split into ``num_sets`` equal sets.

    >>> round(expected_distinct(8, 256, 8), 4)
    5.2947
    """
    return num_sets * p_hit(num_experts, topk, num_experts // num_sets, num_groups, group_topk)


def topology_aware_remote_fraction(
    ranks: int, ranks_per_node: int, intra_gbps: float, inter_gbps: float
) -> float:
    """TA-MoE's share of a token's non-local copies sent off the node, so both links finish together.

    Uniform routing sends ``(P-r)/(P-1)`` of them off the node. Balancing the link times
    ``f/B_inter = (1-f)/B_intra`` per unit of capacity, weighted by how many peers each link reaches,
    gives ``f = B_inter*(P-r) / (B_intra*(r-1) + B_inter*(P-r))``.
    """
    remote_peers, local_peers = ranks - ranks_per_node, ranks_per_node - 1
    if remote_peers == 0:
        return 0.0
    return inter_gbps * remote_peers / (intra_gbps * local_peers + inter_gbps * remote_peers)


@dataclass(frozen=True, slots=True)
class DispatchCopies:
    """Copies of one source token's hidden vector leaving its GPU, per link class, one direction."""

    inter_node: float
    """Copies over the scale-out link."""
    intra_node: float
    """Copies over the scale-up link (NVLink), forwarding included."""
    tp_allgather: float = 0.0
    """Copies received by the TP all-gather that rebuilds deduplicated tokens (monta), intra-node."""


def dispatch_copies(
    kind: str,
    *,
    num_experts: int,
    topk: int,
    ep: int,
    ep_ranks_per_node: int,
    tp: int = 1,
    tp_duplicates: bool = False,
    capacity_factor: float | None = None,
    num_groups: int = 1,
    group_topk: int = 1,
    remote_fraction: float | None = None,
    condense_fraction: float = 0.0,
) -> DispatchCopies:
    """Copies per source token for one dispatch (the combine is symmetric).

    ``tp_duplicates``: the TP ranks hold the same tokens (TP without sequence parallelism), so a flat
    all-to-all sends t copies of everything. ``remote_fraction`` overrides the uniform off-node share
    of non-local copies (topology-aware routing).
    """
    p, r = ep, ep_ranks_per_node
    n = p // r
    keep = 1.0 - condense_fraction
    if kind == "hierarchical":
        per_rank = num_experts // p
        p_rank = p_hit(num_experts, topk, per_rank, num_groups, group_topk)
        p_node = p_hit(num_experts, topk, per_rank * r, num_groups, group_topk)
        inter = n * p_node - p_node  # distinct remote nodes
        intra = p * p_rank - n * p_rank  # distinct target ranks, minus self and remote peers
        return DispatchCopies(inter_node=keep * inter, intra_node=keep * intra)
    if kind == "allgather":
        world = p * tp
        remote = (p - r) * tp
        return DispatchCopies(inter_node=keep * remote, intra_node=keep * (world - remote - 1))
    copies = float(topk)
    if capacity_factor is not None and kind == "monta":
        copies *= capacity_factor  # DeepSpeed's GShard layout pads every expert to capacity
    non_local = copies * (p - 1) / p
    if remote_fraction is None:
        remote_fraction = (p - r) / (p - 1) if p > 1 else 0.0
    inter, intra = non_local * remote_fraction, non_local * (1 - remote_fraction)
    if kind == "monta":
        # Each TP rank sends only its share of the (identical) tokens; the TP all-gather rebuilds the rest.
        return DispatchCopies(
            inter_node=keep * inter, intra_node=keep * intra, tp_allgather=keep * copies * (tp - 1)
        )
    duplicates = tp if tp_duplicates else 1
    return DispatchCopies(inter_node=keep * inter * duplicates, intra_node=keep * intra * duplicates)


@lru_cache(maxsize=256)
def expected_max_normal(n: int) -> float:
    """E[max of n independent standard normals]: ``int x n phi(x) Phi(x)^(n-1) dx`` (trapezoid rule).

    >>> round(expected_max_normal(2), 4), round(expected_max_normal(16), 3)
    (0.5642, 1.766)
    """
    if n <= 1:
        return 0.0
    steps, low, high = 4000, -10.0, 10.0
    width = (high - low) / steps
    total = 0.0
    for i in range(steps + 1):
        x = low + i * width
        density = math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + math.erf(x / math.sqrt(2)))
        weight = 0.5 if i in (0, steps) else 1.0
        total += weight * x * n * density * cdf ** (n - 1)
    return total * width


def migration_saved_fraction(copies_per_sequence: float, ranks: int) -> float:
    """Luffy's sequence migration (arXiv 2411.15419 §IV-A): share of a sequence's combine copies saved.

    A sequence whose ``n = L*k`` routed copies spread over P ranks is rebuilt on the rank holding the
    most of them instead of its home rank, which holds n/P on average. Under uniform routing the
    counts are multinomial and the expected maximum is about ``n/P + sqrt(n/P (1 - 1/P)) M(P)`` with
    ``M(P)`` the expected maximum of P standard normals,
    so the saved share is ``(E[max] - n/P) / n``. Real routers are skewed (Luffy: over half of the
    sequences use at most 3 experts), so a routing trace saves more; this is the uniform bound.
    """
    if ranks <= 1 or copies_per_sequence <= 0:
        return 0.0
    mean = copies_per_sequence / ranks
    excess: float = math.sqrt(mean * (1 - 1 / ranks)) * expected_max_normal(ranks)
    return min(excess, copies_per_sequence - mean) / copies_per_sequence
