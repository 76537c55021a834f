"""Data-parallel terms of one step: gradient reduction and parameter gathering (or FSDP's per-layer
gathers), each hidden behind compute up to a share of the busiest rank's time.

Megatron overlaps the gradient reduce-scatter with the backward of the last micro-batch (2/3 of a
micro-batch's time) and the parameter all-gather with the forward of the first (1/3); FSDP prefetches
each layer's weights behind the previous layer's compute. Without ``--overlap-grad-reduce``
(``ParallelConfig.overlap_grad_reduce`` off) Megatron reduces after the last backward and gathers before
the first forward, and Megatron-FSDP gathers and reduces each layer in line: nothing hides them. Gradients reduce in their buffer's dtype (FP32 by Megatron-LM's default, 4 B), parameters
gather in BF16 (2 B), the GEMM weights in FP8 (1 B) under ``--fp8-param-gather`` with the blockwise
recipe; dense parameters over DP x CP, expert parameters over EDP.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.costmodel import comm
from planner.costmodel.geometry import GroupGeometry, group_geometry
from planner.costmodel.params import count_params
from planner.costmodel.terms import LayerContext
from planner.schema import CollectiveKind, CostTerm, MeshAxis, ParallelConfig

__all__ = ["FP8_GATHER_BYTES", "OverlappedTerm", "data_parallel_terms", "sum_bytes"]

FP8_GATHER_BYTES = 1.0
"""Bytes a GEMM weight sends in the parameter all-gather under ``--fp8-param-gather`` with a per-tensor or
blockwise recipe: its FP8 data (uint8 param buffer, param_and_grad_buffer.py:921-924 at Megatron-LM d98e8a6;
"50% parameter all-gather ... except MXFP8", moe/README.md:460). MXFP8 gathers BF16 (2)."""


@dataclass(frozen=True, slots=True)
class OverlappedTerm:
    """A term hidden behind compute: exposed ``max(0, total - slope * t_rank)`` per step."""

    name: str
    total_s: float
    slope: float
    link_class: str | None
    bytes_per_link_class: tuple[tuple[str, float], ...] = ()
    """Bytes one GPU sends per step for this term, per link class."""

    def cost(self, rank_seconds: float) -> CostTerm:
        exposed = max(0.0, self.total_s - self.slope * rank_seconds)
        return CostTerm(name=self.name, total_s=self.total_s, exposed_s=exposed, link_class=self.link_class)


def data_parallel_terms(ctx: LayerContext, num_microbatches: int) -> list[OverlappedTerm]:
    """Gradient reduction and parameter gathering per step (or per layer with FSDP).

    Megatron overlaps the gradient reduce-scatter with the backward of the last micro-batch (2/3 of a
    micro-batch's time) and the parameter all-gather with the forward of the first (1/3); FSDP
    prefetches each layer's weights behind the previous layer's compute.
    """
    model, p, cluster = ctx.model, ctx.parallel, ctx.cluster
    grad = p.optimizer.gradient_bytes
    counts = count_params(model)
    dense_local = (counts.total - counts.routed_experts) / (p.tp * p.pp)
    expert_local = counts.routed_experts / (p.ep * p.etp * p.pp)
    # Bytes a gathered parameter sends: BF16, or FP8 for the GEMM weights under --fp8-param-gather
    # (all but the embedding and output layer; the norms and router, a few thousandths, counted as GEMMs).
    dense_gathered = 2 * dense_local
    expert_gathered = 2 * expert_local
    if p.fp8_param_gather and ctx.training.precision == "fp8":
        bf16 = counts.embedding_and_output / (p.tp * p.pp)
        dense_gathered = 2 * bf16 + FP8_GATHER_BYTES * (dense_local - bf16)
        expert_gathered = FP8_GATHER_BYTES * expert_local
    g = cluster.num_gpus_per_node
    dp_geo = _dp_cp_geometry(p, g)
    edp_geo = group_geometry(p, MeshAxis.EDP, g)
    if p.fsdp:
        layers = max(model.num_layers / p.pp, 1.0)
        # Forward and backward each gather a layer's weights once. Recompute does not add a third:
        # FSDP wraps the checkpointed layer, so the weights the recomputed forward gathers stay until
        # that layer's backward has used them (facebookresearch/fairscale#777 "FSDP(checkpoint(module))";
        # Megatron-FSDP keeps recomputed parameters "materialized until their matching post-backward
        # gradient reduction", NVIDIA/Megatron-LM#6153).
        gathers = 2
        one = gathers * (
            comm.ring_time(cluster, "all_gather", dense_gathered / layers, dp_geo)
            + comm.ring_time(cluster, "all_gather", expert_gathered / layers, edp_geo)
        )
        one += comm.ring_time(cluster, "reduce_scatter", grad * dense_local / layers, dp_geo)
        one += comm.ring_time(cluster, "reduce_scatter", grad * expert_local / layers, edp_geo)
        # per layer and micro-batch: max(0, one - t_rank / layers); summed: max(0, total - m * t_rank)
        total = one * layers * num_microbatches
        sent = sum_bytes(
            comm.ring_bytes("all_gather", gathers * dense_gathered, dp_geo),
            comm.ring_bytes("all_gather", gathers * expert_gathered, edp_geo),
            comm.ring_bytes("reduce_scatter", grad * dense_local, dp_geo),
            comm.ring_bytes("reduce_scatter", grad * expert_local, edp_geo),
        )
        sent = {link: amount * num_microbatches for link, amount in sent.items()}
        behind = (
            float(num_microbatches) if p.overlap_grad_reduce else 0.0
        )  # off: each layer waits for its own
        return [OverlappedTerm("fsdp_gather_scatter", total, behind, _link(dp_geo), tuple(sent.items()))]
    kind: CollectiveKind = "reduce_scatter" if p.distributed_optimizer else "all_reduce"
    rs = comm.ring_time(cluster, kind, grad * dense_local, dp_geo) + comm.ring_time(
        cluster, kind, grad * expert_local, edp_geo
    )
    ag = 0.0
    if p.distributed_optimizer:
        ag = comm.ring_time(cluster, "all_gather", dense_gathered, dp_geo) + comm.ring_time(
            cluster, "all_gather", expert_gathered, edp_geo
        )
    reduced = sum_bytes(
        comm.ring_bytes(kind, grad * dense_local, dp_geo), comm.ring_bytes(kind, grad * expert_local, edp_geo)
    )
    gathered = (
        sum_bytes(
            comm.ring_bytes("all_gather", dense_gathered, dp_geo),
            comm.ring_bytes("all_gather", expert_gathered, edp_geo),
        )
        if p.distributed_optimizer
        else {}
    )
    hidden = 1.0 if p.overlap_grad_reduce else 0.0  # off: the step waits for both collectives
    return [
        OverlappedTerm("dp_grad_reduce", rs, hidden * 2 / 3, _link(dp_geo), tuple(reduced.items())),
        OverlappedTerm("dp_param_all_gather", ag, hidden / 3, _link(dp_geo), tuple(gathered.items())),
    ]


def sum_bytes(*parts: dict[str, float]) -> dict[str, float]:
    total: dict[str, float] = {}
    for part in parts:
        for link, amount in part.items():
            total[link] = total.get(link, 0.0) + amount
    return total


def _dp_cp_geometry(p: ParallelConfig, gpus_per_node: int) -> GroupGeometry:
    """The gradient-reduction group of dense parameters: DP x CP (Megatron's 'dp-cp')."""
    dp = group_geometry(p, MeshAxis.DP, gpus_per_node)
    if p.cp == 1:
        return dp
    cp = group_geometry(p, MeshAxis.CP, gpus_per_node)
    return GroupGeometry(
        size=dp.size * cp.size,
        num_nodes=dp.num_nodes * cp.num_nodes,
        ranks_per_node=dp.ranks_per_node * cp.ranks_per_node,
    )


def _link(geo: GroupGeometry) -> str:
    return "inter_node" if geo.crosses_nodes else "intra_node"
