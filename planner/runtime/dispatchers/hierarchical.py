"""``hierarchical``: node-deduplicated two-phase dispatch with in-node pre-reduced combine (DeepEP internode
/ NVIDIA Hybrid-EP, ``deepseek-ai/DeepEP`` branch ``hybrid-ep`` ``docs/Hybrid-EP_Implementation.md``;
DeepSeek-V3, arXiv 2412.19437 §3.2.2; ``../shared/reference/seeds.md`` §3.1, §6.2).

Phase 1 over the *cross* group (the members with my local index on every node): one copy per distinct
(token, destination node) goes to my peer on that node, with K metadata slots (node-local expert id as
int32, -1 when unused, and the combine weight). Phase 2 over the *intra* group (the EP members of my
node): each received copy goes once to each member that holds one of its experts. The expert rank
weights its outputs and sums them per row; the forwarder sums its members' rows; each (token, node)
comes back as one pre-reduced row.

Bytes one rank sends per forward call, by :class:`TrafficMeter` kind (legend in the package docstring):
``dispatch inter = #distinct (token, node != mine) * (H*b + K*(b_w + 4))``,
``dispatch intra = #distinct (received copy, member != me) * (H*b + K*(b_w + 4))``,
``combine``: one ``H*b`` row back per copy (sent by the copy's receiver), ``counts = (N - 1)*8 +
(G - 1)*8``. Flat sends ``#(pair, remote node) * H*b`` inter-node, so hierarchical sends less when the
pairs per distinct (token, remote node) average more than ``1 + K*(b_w + 4) / (H*b)``: many experts per
node and top-K >= 2 (true for real H; a toy H can make the metadata outweigh the saving). One node:
phase 1 is a local copy and this is an intra-node all-to-all with per-rank deduplication. Backward: the
transposed all-to-alls, ``<kind>_backward`` (gradients of the rows and weights, not of the slot ids).

Groups. Ranks are node-contiguous, ``node_of(r) = r // ranks_per_node``; each EP group must be ascending
with the same number of members on each node it spans.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor

from planner.execution.process_group import subgroup
from planner.runtime.dispatchers._collectives import Comm, all_to_all, all_to_all_ints, exchange_counts
from planner.runtime.dispatchers._local import local_factory
from planner.runtime.dispatchers._routing import check_experts, weighted_sum
from planner.runtime.dispatchers._setup import DispatcherSetup
from planner.runtime.meter import TrafficMeter, node_of
from planner.runtime.protocols import ExpertFn, TokenDispatcher
from planner.schema import ParallelConfig

__all__ = [
    "SENDS_TP_DUPLICATES",
    "HierarchicalDispatcher",
    "HierarchicalGroups",
    "factory",
    "hierarchical_groups",
    "refuse",
]

SENDS_TP_DUPLICATES = True
"""Without sequence parallelism TP ranks hold the same tokens: every TP rank sends its copy of a duplicated token."""


@dataclass(frozen=True)
class HierarchicalGroups:
    """The sub-groups of one EP group that :class:`HierarchicalDispatcher` communicates over.

    EP member ``m`` (position in the sorted ``ep_ranks``) is on node index ``m // members_per_node`` of
    the group and has local index ``m % members_per_node`` there.
    """

    ep_ranks: tuple[int, ...]
    ranks_per_node: int
    num_nodes: int
    """N: nodes the EP group spans."""
    members_per_node: int
    """G: EP members on each of those nodes."""
    member: int
    """This rank's position in ``ep_ranks``."""
    intra: dist.ProcessGroup | None
    """The EP members on this rank's node (``None`` when G = 1)."""
    cross: dist.ProcessGroup | None
    """The EP members with this rank's local index, one per node (``None`` when N = 1)."""


def _node_shape(ep_ranks: tuple[int, ...], ranks_per_node: int) -> tuple[int, int]:
    """(N nodes, G members per node) of an EP group; ValueError unless ascending and node-balanced."""
    if list(ep_ranks) != sorted(set(ep_ranks)):
        raise ValueError(f"EP group {list(ep_ranks)} must be strictly ascending")
    nodes: dict[int, int] = {}
    for r in ep_ranks:
        nodes[node_of(r, ranks_per_node)] = nodes.get(node_of(r, ranks_per_node), 0) + 1
    if len(set(nodes.values())) != 1:
        raise ValueError(
            f"EP group {list(ep_ranks)} must have the same number of members on every node it spans "
            f"(ranks_per_node {ranks_per_node}); members per node: {list(nodes.values())}"
        )
    return len(nodes), len(ep_ranks) // len(nodes)


def hierarchical_groups(
    ep_ranks_all: Sequence[Sequence[int]], ranks_per_node: int
) -> HierarchicalGroups | None:
    """Create the intra-node and cross-node sub-groups of every EP group; return this rank's.

    Collective over the whole world: ``dist.new_group`` must be called by every rank for every group in
    the same order, so **every rank must call this with the same arguments** (all EP groups of the
    layout, e.g. ``[[0, 1, 2, 3], [4, 5, 6, 7]]``). For each EP group in turn it creates the intra-node
    groups (node by node) and then the cross-node groups (local index by local index); size-1 groups are
    not created. Returns ``None`` on a rank that is in none of the groups.

    Each EP group must be ascending with the same number of members on each node it spans
    (node-contiguous placement, ``node_of(r) = r // ranks_per_node``).
    """
    groups = [tuple(ranks) for ranks in ep_ranks_all]
    shapes = [_node_shape(ranks, ranks_per_node) for ranks in groups]  # validate before any new_group
    me = dist.get_rank()
    mine: HierarchicalGroups | None = None
    for ranks, (num_nodes, per_node) in zip(groups, shapes, strict=True):
        intra = cross = None
        if per_node > 1:
            for n in range(num_nodes):
                members = list(ranks[n * per_node : (n + 1) * per_node])
                group = subgroup(members)
                intra = group if me in members else intra
        if num_nodes > 1:
            for local in range(per_node):
                peers = list(ranks[local::per_node])
                group = subgroup(peers)
                cross = group if me in peers else cross
        if me in ranks:
            mine = HierarchicalGroups(
                ep_ranks=ranks,
                ranks_per_node=ranks_per_node,
                num_nodes=num_nodes,
                members_per_node=per_node,
                member=ranks.index(me),
                intra=intra,
                cross=cross,
            )
    return mine


def _comm_or_self(group: dist.ProcessGroup | None, meter: TrafficMeter | None) -> Comm:
    if group is None:
        rank = dist.get_rank()
        return Comm(group=cast(dist.ProcessGroup, None), ranks=(rank,), rank=0, meter=meter)
    return Comm.of(group, meter)


def _slot_hits(slot_target: Tensor, num_targets: int) -> Tensor:
    """[rows, num_targets] bool: which targets a row's K slots name (slot value -1 = unused)."""
    index = torch.where(slot_target >= 0, slot_target, num_targets).long()
    hits = torch.zeros((slot_target.shape[0], num_targets + 1), dtype=torch.bool, device=slot_target.device)
    return hits.scatter_(1, index, True)[:, :num_targets]


def _route_copies(
    rows: Tensor, slot_expert: Tensor, slot_weight: Tensor, experts_per_target: int, comm: Comm, kind: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[int], list[int]]:
    """Send one copy of each row to each target (group member) that holds one of its slot experts.

    ``slot_expert`` [R, K] are expert ids numbered within the group (``target = id // experts_per_target``),
    -1 for unused slots; the copy to a target keeps the slots of that target's experts, renumbered
    within the target, and their weights. Returns the received rows, slot ids, slot weights, the source
    row of each sent copy (send order) and the send/recv split sizes.
    """
    target = torch.where(slot_expert >= 0, slot_expert // experts_per_target, -1)
    hits = _slot_hits(target, comm.size)
    copy_target, copy_row = hits.t().nonzero(as_tuple=True)  # target-major: the all-to-all's send order
    match = target.index_select(0, copy_row) == copy_target.unsqueeze(1)
    ids = slot_expert.index_select(0, copy_row) - (copy_target * experts_per_target).unsqueeze(1)
    send_ids = torch.where(match, ids, -1).to(torch.int32)
    send_weights = slot_weight.index_select(0, copy_row) * match
    send_counts = torch.bincount(copy_target, minlength=comm.size)
    # One device->host copy per phase for the split sizes.
    send = send_counts.tolist()
    recv = exchange_counts(send_counts, comm).tolist()
    x = all_to_all(rows.index_select(0, copy_row), recv, send, comm, kind)
    w = all_to_all(send_weights, recv, send, comm, kind)
    s = all_to_all_ints(send_ids, recv, send, comm, kind)
    return x, s, w, copy_row, send, recv


class HierarchicalDispatcher:
    """Node-deduplicated two-phase dispatch with in-node pre-reduced combine (DeepEP / Hybrid-EP style).

    A token crosses the inter-node link at most once per destination node and comes back as one
    pre-reduced row per node; see the module docstring for the algorithm and its byte formulas.

    Parameters
    ----------
    groups
        From :func:`hierarchical_groups` (collective over the world: call it on every rank).
    num_experts
        E, divisible by the EP size.
    meter
        Counts bytes and time (kinds ``dispatch``, ``combine``, ``counts``). Inter-node bytes are phase 1
        (cross group), intra-node bytes phase 2 (intra group).
    """

    def __init__(
        self, groups: HierarchicalGroups, num_experts: int, meter: TrafficMeter | None = None
    ) -> None:
        self.groups = groups
        self.num_experts = num_experts
        self.num_local_experts = check_experts(num_experts, len(groups.ep_ranks))
        self._cross = _comm_or_self(groups.cross, meter)
        self._intra = _comm_or_self(groups.intra, meter)

    def __call__(self, tokens: Tensor, expert_ids: Tensor, weights: Tensor, experts: ExpertFn) -> Tensor:
        num_tokens = tokens.shape[0]
        per_member = self.num_local_experts
        per_node = per_member * self.groups.members_per_node
        # Phase 1 (inter-node): slots hold global expert ids; a node "holds" per_node of them.
        x1, s1, w1, copy1, send1, recv1 = _route_copies(
            tokens, expert_ids, weights, per_node, self._cross, "dispatch"
        )
        # Phase 2 (intra-node): slots hold node-local ids; a member holds per_member of them.
        x2, s2, w2, copy2, send2, recv2 = _route_copies(x1, s1, w1, per_member, self._intra, "dispatch")
        # The expert rank: one (row, slot) pair per used slot, grouped by local expert.
        used = s2 >= 0
        row, slot = used.nonzero(as_tuple=True)
        local = s2[row, slot].long()
        order = torch.argsort(local, stable=True)
        row, slot, local = row[order], slot[order], local[order]
        counts = torch.bincount(local, minlength=per_member).tolist()
        y = experts(x2.index_select(0, row), counts)
        # Weighted and summed per received row: one row per (copy, member) goes back.
        z2 = weighted_sum(y, row, w2[row, slot], x2.shape[0])
        z1 = weighted_sum(all_to_all(z2, send2, recv2, self._intra, "combine"), copy2, None, x1.shape[0])
        # Pre-reduced in the node: one row per (token, node) crosses back.
        z0 = all_to_all(z1, send1, recv1, self._cross, "combine")
        return weighted_sum(z0, copy1, None, num_tokens)


def refuse(parallel: ParallelConfig) -> str | None:
    """The hierarchical dispatcher runs every layout the run loop builds (node balance is checked by
    :func:`hierarchical_groups`, which knows the ranks per node)."""
    return None


def factory(setup: DispatcherSetup) -> Callable[[int], TokenDispatcher]:
    """Create every EP group's sub-groups (collective: once per run, on every rank), then one
    :class:`HierarchicalDispatcher` per layer (local with an EP group of one)."""
    if setup.parallel.ep == 1:
        return local_factory(setup.num_experts)
    groups = hierarchical_groups(setup.ep_groups, setup.ranks_per_node)
    if groups is None:
        raise ValueError(f"rank {dist.get_rank()} is in none of the EP groups {setup.ep_groups}")
    experts, meter = setup.num_experts, setup.meter

    def build(_layer: int) -> TokenDispatcher:
        return HierarchicalDispatcher(groups, experts, meter=meter)

    return build
