"""Luffy's sequence migration (Chen et al., arXiv 2411.15419 §IV-A; ``../shared/reference/seeds.md`` §4.1).

At the combine of an MoE layer, a flat all-to-all brings every expert output back to the rank that sent
the token. Luffy instead rebuilds each sequence on the rank that already holds most of its routed
(token, expert) pairs, and the sequence continues there: its next attention and MoE layers run on that
rank. Experts never move. Exact: the same sums are computed, elsewhere.

Decision (Luffy's Algorithm 1 with q = 1, pure traffic minimisation): sequence i goes to the EP member
``argmax_j pairs_ij``, where ``pairs_ij`` counts i's pairs whose expert member j holds; a tie keeps it
where it is (else the lowest member). The rank holding a sequence decides alone (it routed every token,
so it knows every ``pairs_ij``); no controller is needed. What then moves, per layer:

- ``dispatch``: every pair's normed token to its expert's member, as the flat all-to-all;
- ``migration_metadata``: each pair's destination (member and token slot there, int64) and its combine
  weight, so that the expert's member weights the output and sends it to the destination; the sequence
  counts (one all-gather of P int64 per member) and the sequences' ids; the labels at the loss;
- ``combine``: each weighted expert output to its sequence's destination, unless that member computed
  it itself;
- ``migration``: for every sequence that leaves, one row per token from the rank it leaves: the
  residual stream plus the shared expert's output plus the outputs of the pairs that rank computed.
  The residual must travel because pre-norm blocks (Megatron, Llama) send experts the normed tokens,
  from which the residual cannot be rebuilt. Luffy's post-norm models (BERT, TransformerXL) send the
  residual itself, so the paper counts only expert outputs; ``moeplan run`` counts this row, and so
  measures what migration saves on a pre-norm model.

Losses. Each member's cross entropy is the sum over the tokens it holds at the end divided by its own
token count (micro-batch x sequence), so the members' losses add up to the sum of their micro-batch
means, as without migration. The routers' auxiliary losses keep the statistics of each member's own
micro-batch (where a sequence started), summed over the EP group; every member adds ``1/P`` of the sum
of the P micro-batches' losses (gradients summed over the group), so the total is unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from planner.runtime.dispatchers._collectives import Comm, all_to_all, all_to_all_ints, exchange_counts, issue
from planner.runtime.dispatchers._routing import check_experts, flat_plan, run_experts
from planner.runtime.layers import to_wide
from planner.runtime.meter import TrafficMeter
from planner.runtime.model import MoELayer, Router
from planner.runtime.tensor_parallel import GroupRing, summed_over

__all__ = ["SequenceMigration", "SequenceTracker"]


def _all_gather(x: Tensor, comm: Comm) -> Tensor:
    """Every member's ``x`` (integer metadata) stacked along a new dim 0, counted as ``migration_metadata``."""
    x = x.contiguous()
    pieces = [torch.empty_like(x) for _ in range(comm.size)]
    issue(
        comm, "migration_metadata", [x.numel() * x.element_size()] * comm.size, x, False,
        lambda: dist.all_gather(pieces, x, group=comm.group),
    )  # fmt: skip
    return torch.stack(pieces)


class SequenceTracker:
    """The sequences this rank holds during one forward, as ids ``origin member * B + row``."""

    def __init__(self, ep_group: dist.ProcessGroup, meter: TrafficMeter | None) -> None:
        self._ep = Comm.of(ep_group, meter)
        self.batch = 0
        self.ids: Tensor | None = None

    def start(self, batch: int, device: torch.device) -> None:
        """A new micro-batch: this rank holds its own ``batch`` sequences."""
        self.batch = batch
        self.ids = self._ep.rank * batch + torch.arange(batch, device=device)

    @property
    def held(self) -> Tensor:
        if self.ids is None:
            raise RuntimeError("the sequence tracker was not started for this forward")
        return self.ids

    def origin_members(self) -> Tensor:
        return self.held // self.batch

    def held_labels(self, labels_BS: Tensor) -> Tensor:
        """The labels of the sequences this rank holds after the last layer (every member's micro-batch
        labels all-gathered over the EP group)."""
        return _all_gather(labels_BS, self._ep).flatten(0, 1).index_select(0, self.held)


class SequenceMigration:
    """One MoE layer's flat dispatch with a migrating combine (module doc); a ``Migration``."""

    def __init__(
        self,
        ep_group: dist.ProcessGroup,
        num_experts: int,
        tracker: SequenceTracker,
        meter: TrafficMeter | None,
    ) -> None:
        self._ep = Comm.of(ep_group, meter)
        self.num_local = check_experts(num_experts, self._ep.size)
        self.tracker = tracker
        self._sums = summed_over(GroupRing(ep_group, self._ep.ranks, None))
        self.decisions = 0
        """(sequence, layer) decisions taken so far."""
        self.moved = 0
        """Of those, the sequences that moved to another member."""

    def __call__(self, x_BSH: Tensor, normed_BSH: Tensor, layer: MoELayer) -> Tensor:
        comm, members = self._ep, self._ep.size
        batch, seq, hidden = x_BSH.shape
        x_TH, normed_TH = x_BSH.reshape(-1, hidden), normed_BSH.reshape(-1, hidden)
        probs_TE, expert_ids_TK, weights_TK = layer.router.route(normed_TH)
        layer.last_aux_loss = self._aux_loss(layer.router, probs_TE, expert_ids_TK, seq)
        top_k = expert_ids_TK.shape[1]
        device = x_BSH.device

        # Where each sequence goes: the member that holds most of its pairs (ties: stay).
        member_BN = (expert_ids_TK // self.num_local).reshape(batch, seq * top_k)
        pairs_BP = F.one_hot(member_BN, members).sum(dim=1)
        stay = torch.arange(members, device=device) == comm.rank
        dest_B = (2 * pairs_BP + stay).argmax(dim=1)
        self.decisions += batch
        self.moved += int((dest_B != comm.rank).sum())
        to_member = torch.bincount(dest_B, minlength=members)
        sequences_PP = _all_gather(to_member, comm)  # [source, destination]
        # A sequence's slot at its destination: sources in member order, each in its own row order.
        order_B = torch.argsort(dest_B, stable=True)
        first_of_dest = torch.cumsum(to_member, 0) - to_member
        rank_in_dest = torch.empty_like(order_B)
        rank_in_dest[order_B] = torch.arange(batch, device=device) - first_of_dest[dest_B[order_B]]
        slot_B = sequences_PP[: comm.rank].sum(dim=0)[dest_B] + rank_in_dest
        dest_T = dest_B.repeat_interleave(seq)
        slot_T = (slot_B.unsqueeze(1) * seq + torch.arange(seq, device=device)).reshape(-1)

        # Dispatch: the flat all-to-all, with each pair's destination and weight.
        plan = flat_plan(expert_ids_TK, None, None, 1, self.num_local, comm)
        send, recv = plan.send_rows, plan.recv_rows
        x_recv = all_to_all(normed_TH.index_select(0, plan.token_index), recv, send, comm, "dispatch")
        meta = torch.stack([dest_T, slot_T], dim=1).index_select(0, plan.token_index)
        meta_recv = all_to_all_ints(meta, recv, send, comm, "migration_metadata")
        w_send = weights_TK.reshape(-1, 1).index_select(0, plan.pair_index)
        w_recv = all_to_all(w_send, recv, send, comm, "migration_metadata")
        y_recv = run_experts(x_recv, plan, layer.expert_fn or layer.experts)
        y_recv = y_recv * w_recv.to(y_recv.dtype)

        # This rank's own pairs join its partial sums: the residual, the shared expert, its experts' rows.
        partial_TH = x_TH
        if layer.shared_expert is not None:
            partial_TH = partial_TH + layer.shared_expert(normed_TH)
        own_start, own_sent_start = sum(recv[: comm.rank]), sum(send[: comm.rank])
        own_rows = torch.arange(own_start, own_start + recv[comm.rank], device=device)
        own_tokens = plan.token_index[own_sent_start : own_sent_start + send[comm.rank]]
        partial_TH = partial_TH.index_add(
            0, own_tokens, y_recv.index_select(0, own_rows).to(partial_TH.dtype)
        )

        # The other sources' rows go to their sequences' destinations.
        others = torch.cat(
            [
                torch.arange(own_start, device=device),
                torch.arange(own_start + recv[comm.rank], sum(recv), device=device),
            ]
        )
        other_dest = meta_recv[others, 0]
        by_dest = others[torch.argsort(other_dest, stable=True)]
        out_counts = torch.bincount(other_dest, minlength=members)
        in_counts = exchange_counts(out_counts, comm)
        out_rows, in_rows = out_counts.tolist(), in_counts.tolist()
        combined = all_to_all(y_recv.index_select(0, by_dest), in_rows, out_rows, comm, "combine")
        combined_slots = all_to_all_ints(
            meta_recv.index_select(0, by_dest)[:, 1:], in_rows, out_rows, comm, "migration_metadata"
        ).reshape(-1)

        # Every sequence's partial sums to its destination (the migrating rows; staying ones are local).
        arriving = sequences_PP[:, comm.rank].tolist()
        leaving = to_member.tolist()
        rows = partial_TH.view(batch, seq, hidden).index_select(0, order_B).reshape(-1, hidden)
        rebuilt = all_to_all(rows, [n * seq for n in arriving], [n * seq for n in leaving], comm, "migration")
        ids = all_to_all_ints(
            self.tracker.held.index_select(0, order_B).unsqueeze(1),
            arriving,
            leaving,
            comm,
            "migration_metadata",
        )
        self.tracker.ids = ids.reshape(-1)
        out_TH = rebuilt.index_add(0, combined_slots, combined.to(rebuilt.dtype))
        return out_TH.view(sum(arriving), seq, hidden)

    def _aux_loss(self, router: Router, probs_TE: Tensor, expert_ids_TK: Tensor, seq: int) -> Tensor:
        """Switch's load-balancing loss of every member's own micro-batch, 1/P of their sum (module doc)."""
        members, experts = self._ep.size, probs_TE.shape[-1]
        top_k = expert_ids_TK.shape[1]
        origin_T = self.tracker.origin_members().repeat_interleave(seq)
        pair_slot = (origin_T.repeat_interleave(top_k) * experts + expert_ids_TK.reshape(-1)).to(torch.long)
        counts_PE = torch.bincount(pair_slot, minlength=members * experts).view(members, experts)
        prob_sums_PE = probs_TE.new_zeros(members, experts).index_add(0, origin_T, probs_TE)
        tokens_P = torch.bincount(origin_T, minlength=members).to(probs_TE.dtype)
        stats = torch.cat([counts_PE.to(probs_TE.dtype), prob_sums_PE, tokens_P.unsqueeze(1)], dim=1)
        summed = self._sums(stats)
        tokens = summed[:, -1:]
        f_PE = summed[:, :experts] / (tokens * top_k)
        P_PE = summed[:, experts:-1] / tokens
        balance = experts * (f_PE * P_PE).sum()
        return router.aux_loss_coeff * balance / members


def migrated_cross_entropy(logits_BSV: Tensor, labels_BS: Tensor, own_tokens: int) -> Tensor:
    """Sum of the held tokens' cross entropies over this rank's own token count (module doc)."""
    summed = F.cross_entropy(
        to_wide(logits_BSV.flatten(0, 1)), labels_BS.flatten(), ignore_index=-100, reduction="sum"
    )
    return summed / own_tokens
