"""Pipeline parallelism of the bundled runtime with ``torch.distributed.pipelining``.

The model is cut into ``pp * vpp`` chunks of consecutive decoder layers (the plan's
``layers_per_stage``, or an even split); the first chunk also holds the embedding, the last the final
norm and the LM head. Chunk ``c`` lives on pipeline rank ``c mod pp`` (Megatron's interleaved
placement: with ``vpp`` virtual stages each rank holds ``vpp`` chunks ``pp`` apart). torch's schedules
run them: ``Schedule1F1B`` for one chunk per rank, ``ScheduleInterleaved1F1B`` for several (Narayanan
et al. 2021, the schedules Megatron uses).

Losses. Every micro-batch backpropagates ``(cross entropy + auxiliary losses) / loss_scale``, as the
unpipelined loop does. The cross entropy is the last chunk's loss function; the MoE layers' auxiliary
losses live on earlier chunks, so each is attached to its layer's output the way Megatron's
``MoEAuxLossAutoScaler`` does: the output passes unchanged, and the backward gives the auxiliary loss
the gradient ``1 / loss_scale``. The schedules' own gradient scaling is off (``scale_grads=False``).

Bytes. The schedules' point-to-point sends are not visible to the traffic meter, so each step counts
them from the shapes: per micro-batch, every chunk but the last sends its output activation to the next
chunk's rank, and every chunk but the first sends its input gradient to the previous one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B
from torch.distributed.pipelining.schedules import _PipelineSchedule
from torch.distributed.pipelining.stage import _PipelineStageBase

from planner.runtime.layers import to_wide
from planner.runtime.meter import TrafficMeter
from planner.runtime.model import MoELayer, MoETransformer

__all__ = ["AttachAuxLoss", "PipelineChunk", "PipelinePlan", "pipeline_plan"]


class AttachAuxLoss(torch.autograd.Function):
    """Identity on ``x``; in backward, ``aux`` receives the gradient ``scale`` (Megatron's
    ``MoEAuxLossAutoScaler``), so a loss computed mid-pipeline reaches the router's weights."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.scale), None


class PipelineChunk(nn.Module):
    """Consecutive decoder layers of one model (with its embedding when first, its head when last)."""

    def __init__(
        self, model: MoETransformer, layers: range, first: bool, last: bool, seq_len: int, aux_scale: float
    ) -> None:
        super().__init__()
        self.embedding = model.embedding if first else None
        self.blocks = nn.ModuleList([model.layers[i] for i in layers])
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.seq_len = seq_len
        self.rope_tables = model.rope_tables
        self.aux_scale = aux_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids [B, S] (first chunk) or the residual stream -> the residual stream or logits (last)."""
        h = self.embedding(x) if self.embedding is not None else x
        # Rotary tables for the rank's whole sequence (``seq_len``, its share under context parallelism):
        # under sequence parallelism the attention's input hook gathers it before the tables are used.
        cos_SD, sin_SD = self.rope_tables(self.seq_len, h.device)
        for block in self.blocks:
            h = block(h, cos_SD, sin_SD)
            ffn = block.ffn
            if isinstance(ffn, MoELayer) and ffn.last_aux_loss is not None:
                h = AttachAuxLoss.apply(h, ffn.last_aux_loss, self.aux_scale)  # type: ignore[no-untyped-call]
        if self.lm_head is not None and self.norm is not None:
            logits: torch.Tensor = self.lm_head(self.norm(h))
            return logits
        return h


class PipelinePlan:
    """This rank's chunks, their stages and the schedule that runs them."""

    def __init__(
        self,
        chunks: dict[int, PipelineChunk],
        num_chunks: int,
        pp_ranks: Sequence[int],
        schedule: _PipelineSchedule,
        micro_batches: int,
        cross_entropies: list[torch.Tensor],
    ) -> None:
        self.chunks = chunks
        self.micro_batches = micro_batches
        self.num_chunks = num_chunks
        self.pp_ranks = list(pp_ranks)
        self.schedule = schedule
        self.cross_entropies = cross_entropies
        """The last chunk's cross entropy of each micro-batch of the current step (unscaled)."""

    @property
    def holds_first(self) -> bool:
        return 0 in self.chunks

    @property
    def holds_last(self) -> bool:
        return self.num_chunks - 1 in self.chunks

    def step(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        """Forward and backward of every micro-batch of ``ids`` (split along dim 0)."""
        self.cross_entropies.clear()
        args = (ids,) if self.holds_first else ()
        target = labels if self.holds_last else None
        self.schedule.step(*args, target=target, return_outputs=False)
        # The first step's shape inference runs the chunks (and the loss) once on placeholder inputs:
        # the step's own micro-batches are the last ones.
        del self.cross_entropies[: -self.micro_batches]

    def count_sends(self, meter: TrafficMeter, activation_bytes: int, micro_batches: int) -> None:
        """Add one step's point-to-point bytes of this rank's chunks to ``meter``."""
        pp = len(self.pp_ranks)
        dst: list[int] = []
        sizes: list[int] = []
        for c in self.chunks:
            if c + 1 < self.num_chunks:  # forward: the output to the next chunk
                dst.append(self.pp_ranks[(c + 1) % pp])
                sizes.append(activation_bytes * micro_batches)
            if c > 0:  # backward: the input's gradient to the previous chunk
                dst.append(self.pp_ranks[(c - 1) % pp])
                sizes.append(activation_bytes * micro_batches)
        meter.add_bytes("pp_p2p", dst, sizes)


def pipeline_plan(
    model: MoETransformer,
    layers: list[range],
    pp_ranks: Sequence[int],
    group: dist.ProcessGroup,
    device: torch.device,
    micro_batches: int,
    seq_len: int,
    loss_scale: float,
) -> PipelinePlan:
    """Cut ``model`` into chunks, keep this rank's, and build their schedule (collective over ``group``)."""
    pp = len(pp_ranks)
    me = list(pp_ranks).index(dist.get_rank())
    num_chunks = len(layers)
    mine = [c for c in range(num_chunks) if c % pp == me]
    chunks = {
        c: PipelineChunk(model, layers[c], c == 0, c == num_chunks - 1, seq_len, 1.0 / loss_scale)
        for c in mine
    }
    stages: list[_PipelineStageBase] = [
        PipelineStage(chunks[c], c, num_chunks, device, group=group) for c in mine
    ]
    cross_entropies: list[torch.Tensor] = []

    def loss_fn(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        cross_entropy = F.cross_entropy(
            to_wide(logits_BSV.flatten(0, 1)), labels_BS.flatten(), ignore_index=-100
        )
        cross_entropies.append(cross_entropy.detach())
        return cross_entropy / loss_scale

    schedule: _PipelineSchedule
    if len(stages) == 1:
        schedule = Schedule1F1B(stages[0], micro_batches, loss_fn=loss_fn, scale_grads=False)
    else:
        schedule = ScheduleInterleaved1F1B(stages, micro_batches, loss_fn=loss_fn, scale_grads=False)
    return PipelinePlan(chunks, num_chunks, pp_ranks, schedule, micro_batches, cross_entropies)
