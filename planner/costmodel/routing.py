"""Routing probabilities behind the dispatch volumes: distinct targets hit, TA-MoE's remote share,
the busiest rank's excess, sequence migration's saving.

Notation (``../shared/reference/seeds.md`` §6.0): P ranks in the EP group over N nodes with r = P/N
ranks per node; E experts, k per token, placed contiguously (E/P per rank); H hidden; b bytes.

Expected distinct targets under top-k routing, exact for uniform routing without replacement
(seeds §6.2): a set holding e of the E experts is hit with probability ``1 - C(E-e, k)/C(E, k)``; with
group-limited routing (g of R expert groups, then k experts among the chosen groups' experts) the
chosen groups are drawn first (hypergeometric) and the k experts among their g*E/R experts.
``D(X)`` = X x P(one of X equal sets is hit). Worked value: E=256, k=8, X=8 gives D=5.2947 (seeds).

Each dispatcher's copies per source token are in its own module of ``planner.costmodel.dispatchers``.
Topology-aware routing (TA-MoE, seeds §2.2/§6.6) moves the split of the k copies between the node and
the rest so that both links finish together: remote fraction ``B_inter*(P-r)/(B_intra*(r-1) + B_inter*(P-r))``
of the non-local copies instead of ``(P-r)/(P-1)``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from math import comb

from planner.schema import ModelSpec, ParallelConfig, TrainingSpec

__all__ = [
    "expected_distinct",
    "expected_max_normal",
    "layout_imbalance",
    "migration_saved_fraction",
    "p_hit",
    "routing_imbalance",
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


def routing_imbalance(copies_per_rank: float, ranks: int) -> float:
    """Expected busiest-rank load over the mean when each routed copy lands on a uniform random rank.

    Load per rank ~ Binomial(ranks * c, 1/ranks); the expected maximum of ``ranks`` such loads is about
    ``c + sigma * M(ranks)`` (normal approximation; M = expected maximum of standard normals),
    sigma = sqrt(c (1 - 1/ranks)).
    """
    if ranks <= 1 or copies_per_rank <= 0:
        return 1.0
    sigma = math.sqrt(copies_per_rank * (1 - 1 / ranks))
    return 1.0 + sigma * expected_max_normal(ranks) / copies_per_rank


def layout_imbalance(model: ModelSpec, training: TrainingSpec, p: ParallelConfig) -> float:
    """The busiest expert rank's load over the mean for a layout and routing mode (1 when balanced)."""
    if not model.is_moe or training.routing == "balanced":
        return 1.0
    tokens = p.micro_batch * training.seq_len / p.cp / p.tp
    copies = tokens * (model.moe_router_topk or 1) * (p.tp if not p.sequence_parallel else 1)
    imbalance = routing_imbalance(copies, p.ep)
    if training.routing == "capacity" and training.capacity_factor is not None:
        imbalance = min(imbalance, max(training.capacity_factor, 1.0))
    return imbalance
