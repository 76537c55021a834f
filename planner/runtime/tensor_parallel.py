"""Megatron-style tensor parallelism of the dense layers (Shoeybi et al., arXiv 1909.08053, §3).

Each attention and dense FFN (the dense layers' MLP and the MoE layers' shared expert) is split over the
TP group without sequence parallelism:

- column-parallel inputs: ``q_proj``, ``k_proj``, ``v_proj``, ``w1``, ``w3`` keep rows
  ``[r * n / t, (r + 1) * n / t)`` of their weight (and bias), so each rank computes ``heads / t``
  attention heads (``query_groups / t`` key/value groups) or ``ffn / t`` FFN columns;
- row-parallel outputs: ``o_proj`` and ``w2`` keep the matching columns; their partial sums are
  all-reduced over the group (Megatron's ``g``: all-reduce forward, identity backward), and the
  block's input passes Megatron's ``f`` (identity forward, all-reduce of the input gradient backward),
  so every rank ends each block with the full activations and the full residual gradient.

Parameters outside these blocks (embedding, norms, router, LM head, routed experts) stay whole on every
TP rank; their gradients are equal on all TP ranks because activations and residual gradients are.

With sequence parallelism (Korthikanti et al., arXiv 2205.05198, §4.2.2) the residual stream between
the blocks is split along the sequence instead of replicated: each TP rank keeps tokens
``[r * s / t, (r + 1) * s / t)``. The embedding's output is split (backward: all-gather); ``f`` becomes
an all-gather of the block's input tokens (backward: reduce-scatter) and ``g`` a reduce-scatter of its
output (backward: all-gather). Norms, the router, the LM head and the routed experts then see only the
rank's tokens, so each rank's loss is its tokens' mean over ``t``, the gradients of the whole
parameters outside the split blocks (norms, router, LM head) are summed over the TP group
(``sequence_parallel_sums``; not the embedding, whose split's backward already gathers the full
gradient), and the router's load-balancing statistics are summed over the group so the auxiliary loss
is the one of all the sequence's tokens. Each token is dispatched once, by the rank that holds it (no
TP duplicates). gloo has no reduce-scatter: it is an all-to-all of the chunks and a sum, which sends
the same bytes.
Values are initialised whole (``init_parameters``) and then sliced, so a TP run starts from exactly the
weights of a one-process run. The all-reduces are counted by the traffic meter as ``tp_all_reduce``
(ring bytes, 2 (t-1)/t of the buffer to the next rank of the group).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from planner.runtime.meter import TrafficMeter
from planner.runtime.model import MLP, CausalSelfAttention, LocalExperts, MoETransformer

__all__ = [
    "COLUMN_PARALLEL",
    "ROW_PARALLEL",
    "GroupRing",
    "merge_tp_states",
    "sequence_chunk",
    "sequence_parallel_sums",
    "shard_dims",
    "shard_tensor_parallel",
    "summed_over",
]

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "w1", "w3")
"""Linear layers whose output features are split (weight dim 0, bias too)."""
ROW_PARALLEL = ("o_proj", "w2")
"""Linear layers whose input features are split (weight dim 1); their output is all-reduced."""


class GroupRing:
    """A group (TP, or CP for ``planner/runtime/context_parallel.py``), its ranks in order, and the meter
    that counts what its collectives send, under the kinds given."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        ranks: Sequence[int],
        meter: TrafficMeter | None,
        gather_kind: str = "sp_all_gather",
        scatter_kind: str = "sp_reduce_scatter",
    ) -> None:
        self.group, self.ranks, self.meter = group, list(ranks), meter
        self.gather_kind, self.scatter_kind = gather_kind, scatter_kind

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.contiguous().clone()
        with self._timed("tp_all_reduce"):
            dist.all_reduce(out, group=self.group)
        self._count("tp_all_reduce", 2 * out.numel() * out.element_size())  # a ring all-reduce sends 2x
        return out

    def _count(self, kind: str, full_bytes: int) -> None:
        """Count a ring's (n-1)/n of ``full_bytes`` sent to the next rank of the group."""
        if self.meter is not None:
            n = len(self.ranks)
            me = self.ranks.index(dist.get_rank())
            self.meter.add_bytes(kind, [self.ranks[(me + 1) % n]], [int((n - 1) / n * full_bytes)])

    def _timed(self, kind: str) -> AbstractContextManager[None]:
        return self.meter.timed(kind) if self.meter is not None else nullcontext()

    def all_gather(self, chunk: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's chunk joined along ``dim`` (rank order)."""
        chunk = chunk.contiguous()
        pieces = [torch.empty_like(chunk) for _ in self.ranks]
        with self._timed(self.gather_kind):
            dist.all_gather(pieces, chunk, group=self.group)
        self._count(self.gather_kind, chunk.numel() * chunk.element_size() * len(self.ranks))
        return torch.cat(pieces, dim=dim)

    def reduce_scatter(self, whole: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's chunk (along ``dim``) of the sum of every rank's ``whole``."""
        chunks = [c.contiguous() for c in whole.chunk(len(self.ranks), dim=dim)]
        received = [torch.empty_like(c) for c in chunks]
        with self._timed(self.scatter_kind):
            dist.all_to_all(received, chunks, group=self.group)
        self._count(self.scatter_kind, whole.numel() * whole.element_size())
        return torch.stack(received).sum(dim=0)

    def rank_chunk(self, whole: torch.Tensor, dim: int) -> torch.Tensor:
        return whole.chunk(len(self.ranks), dim=dim)[self.ranks.index(dist.get_rank())].contiguous()


Collective = Callable[[GroupRing, torch.Tensor], torch.Tensor]


def _conjugate_pair(
    name: str, doc: str, forward: Collective, backward: Collective
) -> type[torch.autograd.Function]:
    """An autograd function that runs ``forward`` on the tensor and ``backward`` on its gradient."""

    def run_forward(ctx: Any, x: torch.Tensor, ring: GroupRing) -> torch.Tensor:
        ctx.ring = ring
        return forward(ring, x)

    def run_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return backward(ctx.ring, grad), None

    members = {"forward": staticmethod(run_forward), "backward": staticmethod(run_backward), "__doc__": doc}
    return type(name, (torch.autograd.Function,), members)


def _identity(_ring: GroupRing, x: torch.Tensor) -> torch.Tensor:
    return x.view_as(x)


def _gather(ring: GroupRing, x: torch.Tensor) -> torch.Tensor:
    return ring.all_gather(x, -2)


def _scatter(ring: GroupRing, x: torch.Tensor) -> torch.Tensor:
    return ring.reduce_scatter(x, -2)


def _sum(ring: GroupRing, x: torch.Tensor) -> torch.Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, group=ring.group)
    return out


_CopyToTensorParallel = _conjugate_pair(
    "_CopyToTensorParallel", "Megatron's ``f``: identity forward, all-reduce of the gradient backward.",
    _identity, lambda ring, grad: ring.all_reduce(grad),
)  # fmt: skip
_ReduceFromTensorParallel = _conjugate_pair(
    "_ReduceFromTensorParallel", "Megatron's ``g``: all-reduce forward, identity backward.",
    lambda ring, x: ring.all_reduce(x), _identity,
)  # fmt: skip
_GatherTokens = _conjugate_pair(
    "_GatherTokens", "Sequence-parallel ``f``: all-gather the tokens forward, reduce-scatter the gradient.",
    _gather, _scatter,
)  # fmt: skip
_ReduceScatterTokens = _conjugate_pair(
    "_ReduceScatterTokens", "Sequence-parallel ``g``: reduce-scatter the partial sums, all-gather the gradient.",
    _scatter, _gather,
)  # fmt: skip
_SplitTokens = _conjugate_pair(
    "_SplitTokens", "This rank's tokens of a whole input forward; the gradient all-gathered backward.",
    lambda ring, x: ring.rank_chunk(x, -2), _gather,
)  # fmt: skip
# Each rank's loss holds the group's statistic once over t, so summing the gradient over the group gives
# each rank's input its full gradient.
_SumOverGroup = _conjugate_pair(
    "_SumOverGroup", "A statistic summed over the group forward, its gradient summed over the group backward.",
    _sum, _sum,
)  # fmt: skip


def _apply(function: type[torch.autograd.Function], x: torch.Tensor, ring: GroupRing) -> torch.Tensor:
    out: torch.Tensor = function.apply(x, ring)  # type: ignore[no-untyped-call]
    return out


def summed_over(ring: GroupRing) -> Callable[[torch.Tensor], torch.Tensor]:
    """A router's ``token_sum`` over the ranks of ``ring``: statistics of all their tokens."""
    return lambda x: _apply(_SumOverGroup, x, ring)


def shard_dims(model: nn.Module) -> dict[str, int]:
    """Name of every TP-split parameter -> the dimension it is split along."""
    dims: dict[str, int] = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, CausalSelfAttention | MLP):
            continue
        for child_name, child in module.named_children():
            if not isinstance(child, nn.Linear):
                continue
            prefix = f"{module_name}.{child_name}"
            if child_name in COLUMN_PARALLEL:
                dims[f"{prefix}.weight"] = 0
                if child.bias is not None:
                    dims[f"{prefix}.bias"] = 0
            elif child_name in ROW_PARALLEL:
                dims[f"{prefix}.weight"] = 1
    return dims


def _slice(linear: nn.Linear, dim: int, rank: int, size: int) -> None:
    linear.weight = nn.Parameter(linear.weight.detach().chunk(size, dim=dim)[rank].clone())
    if dim == 0 and linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach().chunk(size, dim=0)[rank].clone())


def shard_tensor_parallel(
    model: MoETransformer,
    group: dist.ProcessGroup,
    ranks: Sequence[int],
    meter: TrafficMeter | None = None,
    sequence_parallel: bool = False,
) -> None:
    """Split the model's attention and dense FFN blocks over the TP group ``ranks`` (this rank's group),
    with the residual stream split along the sequence when ``sequence_parallel``.

    Call after ``init_parameters`` (the slices come from the whole, initialised weights).
    """
    size, rank = len(ranks), list(ranks).index(dist.get_rank())
    if size == 1:
        return
    ring = GroupRing(group, ranks, meter)
    into: type[torch.autograd.Function] = _GatherTokens if sequence_parallel else _CopyToTensorParallel
    out_of: type[torch.autograd.Function] = (
        _ReduceScatterTokens if sequence_parallel else _ReduceFromTensorParallel
    )
    if sequence_parallel:
        model.embedding.register_forward_hook(
            lambda _module, _args, output: _apply(_SplitTokens, output, ring)
        )
        for layer in model.moe_layers():
            layer.router.token_sum = summed_over(ring)
    for module in model.modules():
        if not isinstance(module, CausalSelfAttention | MLP):
            continue
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear) and child_name in COLUMN_PARALLEL + ROW_PARALLEL:
                _slice(child, 0 if child_name in COLUMN_PARALLEL else 1, rank, size)
        module.register_forward_pre_hook(lambda _module, args: (_apply(into, args[0], ring), *args[1:]))
        module.register_forward_hook(lambda _module, _args, output: _apply(out_of, output, ring))


def merge_tp_states(
    states: Sequence[Mapping[str, torch.Tensor]], dims: Mapping[str, int]
) -> dict[str, torch.Tensor]:
    """The TP-split tensors of the TP ranks' states (in TP rank order), each joined whole.

    Only split names are returned: everything else is each rank's own (whole, or its experts, which
    belong to the expert grid and not to the TP group).
    """
    return {name: torch.cat([state[name] for state in states], dim=dim) for name, dim in dims.items()}


def sequence_chunk(tokens: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """This rank's share of a [B, S] batch along the sequence (the labels its logits predict)."""
    return tokens.chunk(len(ranks), dim=1)[list(ranks).index(dist.get_rank())].contiguous()


def sequence_parallel_sums(model: MoETransformer) -> list[nn.Parameter]:
    """Whole parameters whose gradient is partial under sequence parallelism: summed over the TP group.

    Every parameter outside the split blocks and the routed experts, except the embedding (its split's
    backward already gathers the full gradient on every rank).
    """
    split = set(shard_dims(model))
    experts = {f"{m}.{n}" for m, module in model.named_modules() if isinstance(module, LocalExperts)
               for n, _ in module.named_parameters(recurse=False)}  # fmt: skip
    return [
        param
        for name, param in model.named_parameters()
        if name not in split and name not in experts and not name.startswith("embedding.")
    ]
