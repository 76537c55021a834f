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
Values are initialised whole (``init_parameters``) and then sliced, so a TP run starts from exactly the
weights of a one-process run. The all-reduces are counted by the traffic meter as ``tp_all_reduce``
(ring bytes, 2 (t-1)/t of the buffer to the next rank of the group).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from planner.runtime.model import MLP, CausalSelfAttention, MoETransformer
from planner.runtime.traffic import TrafficMeter

__all__ = ["COLUMN_PARALLEL", "ROW_PARALLEL", "merge_tp_states", "shard_dims", "shard_tensor_parallel"]

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "w1", "w3")
"""Linear layers whose output features are split (weight dim 0, bias too)."""
ROW_PARALLEL = ("o_proj", "w2")
"""Linear layers whose input features are split (weight dim 1); their output is all-reduced."""


class _Ring:
    """The TP group, its ranks in order, and the meter that counts what its all-reduces send."""

    def __init__(self, group: dist.ProcessGroup, ranks: Sequence[int], meter: TrafficMeter | None) -> None:
        self.group, self.ranks, self.meter = group, list(ranks), meter

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.contiguous().clone()
        if self.meter is None:
            dist.all_reduce(out, group=self.group)
            return out
        with self.meter.timed("tp_all_reduce"):
            dist.all_reduce(out, group=self.group)
        n = len(self.ranks)
        me = self.ranks.index(dist.get_rank())
        size = int(2 * (n - 1) / n * out.numel() * out.element_size())
        self.meter.add_bytes("tp_all_reduce", [self.ranks[(me + 1) % n]], [size])
        return out


class _CopyToTensorParallel(torch.autograd.Function):
    """Megatron's ``f``: identity forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, ring: _Ring) -> torch.Tensor:
        ctx.ring = ring
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.ring.all_reduce(grad), None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """Megatron's ``g``: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, ring: _Ring) -> torch.Tensor:
        return ring.all_reduce(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _apply(function: type[torch.autograd.Function], x: torch.Tensor, ring: _Ring) -> torch.Tensor:
    out: torch.Tensor = function.apply(x, ring)  # type: ignore[no-untyped-call]
    return out


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
    model: MoETransformer, group: dist.ProcessGroup, ranks: Sequence[int], meter: TrafficMeter | None = None
) -> None:
    """Split the model's attention and dense FFN blocks over the TP group ``ranks`` (this rank's group).

    Call after ``init_parameters`` (the slices come from the whole, initialised weights).
    """
    size, rank = len(ranks), list(ranks).index(dist.get_rank())
    if size == 1:
        return
    ring = _Ring(group, ranks, meter)
    for module in model.modules():
        if not isinstance(module, CausalSelfAttention | MLP):
            continue
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear) and child_name in COLUMN_PARALLEL + ROW_PARALLEL:
                _slice(child, 0 if child_name in COLUMN_PARALLEL else 1, rank, size)
        module.register_forward_pre_hook(
            lambda _module, args: (_apply(_CopyToTensorParallel, args[0], ring), *args[1:])
        )
        module.register_forward_hook(
            lambda _module, _args, output: _apply(_ReduceFromTensorParallel, output, ring)
        )


def merge_tp_states(
    states: Sequence[Mapping[str, torch.Tensor]], dims: Mapping[str, int]
) -> dict[str, torch.Tensor]:
    """The TP-split tensors of the TP ranks' states (in TP rank order), each joined whole.

    Only split names are returned: everything else is each rank's own (whole, or its experts, which
    belong to the expert grid and not to the TP group).
    """
    return {name: torch.cat([state[name] for state in states], dim=dim) for name, dim in dims.items()}
