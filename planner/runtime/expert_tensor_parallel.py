"""Expert tensor parallelism (ETP > 1): each routed expert's FFN split over the ETP group.

Megatron-Core's folded expert grid (``etp-ep-edp-pp``, ETP innermost) gives the ETP peers of a rank the
same experts, each holding a slice of every expert's FFN columns: ``w1`` and ``w3`` keep columns
``[r * F / e, (r + 1) * F / e)`` (column-parallel) and ``w2`` the matching rows (row-parallel). A rank's
dispatcher runs inside its EP group (the ranks of its own ETP index), so each ETP peer receives
different rows for the same local experts. Around the experts (Megatron's ``MoEAlltoAllTokenDispatcher``
with ``expert_tensor_parallel_size > 1``):

1. the peers' rows are all-gathered (uneven: every peer has its own count per local expert) and
   regrouped by local expert;
2. each peer runs its slice of every expert on all the rows, a partial sum of the output;
3. the partial outputs are reduce-scattered: each peer gets the sum for its own rows back.

The backward of the all-gather is a reduce-scatter of the rows' gradients and the other way round.
Both are ``all_to_all_single`` with uneven splits, which gloo and NCCL run alike; the traffic meter
counts them as ``etp_all_gather`` and ``etp_reduce_scatter`` (each rank's rows to each peer, and each
peer's partial rows to that peer). Weights are initialised whole and sliced, so an ETP run starts from
the weights of a one-process run.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from itertools import accumulate
from typing import Any

import torch
import torch.distributed as dist

from planner.runtime.meter import TrafficMeter
from planner.runtime.model import LocalExperts, MoETransformer

__all__ = ["EXPERT_SHARD_DIMS", "ExpertTensorParallel", "expert_shard_dims", "shard_expert_tensor_parallel"]

EXPERT_SHARD_DIMS = {"w1": 2, "w3": 2, "w2": 1}
"""Stacked expert weights ([count, H, F] and [count, F, H]) and the dimension ETP splits."""


class _Peers:
    """The ETP group, its ranks in order, and the meter."""

    def __init__(self, group: dist.ProcessGroup, ranks: Sequence[int], meter: TrafficMeter | None) -> None:
        self.group, self.ranks, self.meter = group, list(ranks), meter
        self.me = self.ranks.index(dist.get_rank())

    def exchange(
        self, x: torch.Tensor, send_rows: list[int], recv_rows: list[int], kind: str
    ) -> torch.Tensor:
        """``send_rows[p]`` rows of ``x`` (in peer order) to peer p; the rows received, in peer order."""
        x = x.contiguous()
        out = x.new_empty((sum(recv_rows), *x.shape[1:]))
        row_bytes = x[0].numel() * x.element_size() if x.shape[0] else 0
        with self.meter.timed(kind) if self.meter is not None else nullcontext():
            dist.all_to_all_single(out, x, recv_rows, send_rows, group=self.group)
        if self.meter is not None:
            self.meter.add_bytes(kind, self.ranks, [n * row_bytes for n in send_rows])
        return out

    def gather(self, x: torch.Tensor, rows: list[int], kind: str) -> torch.Tensor:
        """Every peer's rows joined in peer order (``rows[p]`` from peer p)."""
        return self.exchange(
            x.repeat(len(self.ranks), *([1] * (x.dim() - 1))), [x.shape[0]] * len(rows), rows, kind
        )

    def reduce_scatter(self, x: torch.Tensor, rows: list[int], kind: str) -> torch.Tensor:
        """The sum over peers of the rows of mine (``x`` holds ``rows[p]`` rows for each peer p in order)."""
        received = self.exchange(x, rows, [rows[self.me]] * len(rows), kind)
        return received.view(len(rows), rows[self.me], *x.shape[1:]).sum(dim=0)


def _rows_pair(name: str, forward: str, backward: str) -> type[torch.autograd.Function]:
    """An autograd function running ``_Peers.<forward>`` on rows and ``_Peers.<backward>`` on their
    gradients, metered as ``etp_<forward>`` and ``etp_<forward>_backward``."""
    kind = "etp_all_gather" if forward == "gather" else f"etp_{forward}"

    def run_forward(ctx: Any, x: torch.Tensor, peers: _Peers, rows: list[int]) -> torch.Tensor:
        ctx.peers, ctx.rows = peers, rows
        out: torch.Tensor = getattr(peers, forward)(x, rows, kind)
        return out

    def run_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return getattr(ctx.peers, backward)(grad, ctx.rows, f"{kind}_backward"), None, None

    members = {"forward": staticmethod(run_forward), "backward": staticmethod(run_backward)}
    return type(name, (torch.autograd.Function,), members)


_GatherRows = _rows_pair("_GatherRows", "gather", "reduce_scatter")
"""All-gather rows forward, reduce-scatter their gradients backward."""
_ReduceScatterRows = _rows_pair("_ReduceScatterRows", "reduce_scatter", "gather")
"""Reduce-scatter partial rows forward, all-gather their gradients backward."""


class ExpertTensorParallel:
    """An ``ExpertFn``: ``experts`` (this rank's column slices) run on the rows of every ETP peer."""

    def __init__(
        self,
        experts: LocalExperts,
        group: dist.ProcessGroup,
        ranks: Sequence[int],
        meter: TrafficMeter | None,
    ) -> None:
        self.experts = experts
        self.peers = _Peers(group, ranks, meter)

    def __call__(self, tokens: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """``tokens`` [N, H] grouped by local expert (``counts`` rows each) -> the experts' outputs [N, H]."""
        peers = len(self.peers.ranks)
        local = len(counts)
        # On the tokens' device: NCCL gathers only device tensors.
        mine = torch.tensor(list(counts), dtype=torch.int64, device=tokens.device)
        everyone = [torch.empty_like(mine) for _ in range(peers)]
        dist.all_gather(everyone, mine, group=self.peers.group)  # int64 metadata: not metered
        per_peer = [[int(n) for n in c.tolist()] for c in everyone]  # [peer][local expert]
        rows = [sum(c) for c in per_peer]
        gathered = _GatherRows.apply(tokens, self.peers, rows)  # type: ignore[no-untyped-call]
        # Peer-major rows -> expert-major (each expert's rows from peer 0, then peer 1, ...): the
        # gathered rows' segments, reordered.
        flat = [n for c in per_peer for n in c]
        starts = [0, *accumulate(flat)]
        segments = [j for i in range(local) for j in range(i, len(flat), local)]
        index = torch.cat(
            [torch.arange(starts[j], starts[j] + flat[j], device=tokens.device) for j in segments]
        )
        totals = [sum(c[i] for c in per_peer) for i in range(local)]
        partial = self.experts(gathered[index], totals)
        back = torch.empty_like(index)
        back[index] = torch.arange(index.numel(), device=index.device)
        out: torch.Tensor = _ReduceScatterRows.apply(partial[back], self.peers, rows)  # type: ignore[no-untyped-call]
        return out


def expert_shard_dims(model: MoETransformer) -> dict[str, int]:
    """Name of every ETP-split expert weight -> the dimension it is split along."""
    dims: dict[str, int] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, LocalExperts):
            for name, _ in module.named_parameters(recurse=False):
                dims[f"{module_name}.{name}"] = EXPERT_SHARD_DIMS[name]
    return dims


def shard_expert_tensor_parallel(
    model: MoETransformer, group: dist.ProcessGroup, ranks: Sequence[int], meter: TrafficMeter | None
) -> None:
    """Slice every MoE layer's experts over the ETP group ``ranks`` and route them through it.

    Call after ``init_parameters`` (the slices come from the whole, initialised weights).
    """
    size = len(ranks)
    if size == 1:
        return
    rank = list(ranks).index(dist.get_rank())
    for layer in model.moe_layers():
        experts = layer.experts
        for name, dim in EXPERT_SHARD_DIMS.items():
            weight = getattr(experts, name)
            if weight is not None:
                setattr(experts, name, torch.nn.Parameter(weight.detach().chunk(size, dim=dim)[rank].clone()))
        layer.expert_fn = ExpertTensorParallel(experts, group, ranks, meter)
