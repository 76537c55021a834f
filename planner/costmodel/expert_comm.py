"""Expert-parallel communication of one MoE layer per micro-batch: the dispatcher's dispatch and combine
(its formulas live in its module of ``planner.costmodel.dispatchers``) and expert tensor parallelism's
all-gather and reduce-scatter around the sharded experts.

Bytes per dispatch and combine: copies per token (the dispatcher's ``copies``) x tokens of the rank x
the busiest rank's routing imbalance x H x 2 bytes: every dispatcher moves BF16 rows, under FP8 training
too (``DISPATCH_BYTES``); forward and backward each move both, and recomputing the MoE layer (full
recompute or ``moe``) runs the forward's again. Sequence migration (Luffy) saves
``routing.migration_saved_fraction`` of the combine. Overlapped with compute (``a2a_overlap``), EP
communication is exposed where Megatron's combined 1F1B schedule leaves the compute stream waiting on it
(``ep_overlap``) and the overlapped compute slows by the share of SMs the dispatcher's kernels hold
(seeds §6.4).
"""

from __future__ import annotations

from dataclasses import replace

from planner.costmodel import comm
from planner.costmodel.dispatchers import DispatchCopies, RoutingShape, dispatcher
from planner.costmodel.ep_overlap import LayerStages, exposed_seconds, unpaired_exposed_seconds
from planner.costmodel.geometry import GroupGeometry, group_geometry
from planner.costmodel.routing import migration_saved_fraction, topology_aware_remote_fraction
from planner.costmodel.terms import LayerContext, Terms
from planner.schema import MeshAxis

__all__ = ["DISPATCH_BYTES", "expert_comm"]

DISPATCH_BYTES = 2.0
"""Bytes per element of a dispatch and a combine, whatever the training precision: no Megatron-Core release
dispatches FP8 through DeepEP or Hybrid-EP (core 0.16-0.19 ``fused_a2a.py`` hands DeepEP's ``dispatch`` the
BF16 hidden states and initialises Hybrid-EP with ``fp8_dispatch = False``, "we do not support fp8
dispatch"; FP8 on the wire, ``moe_dispatch_fwd_dtype``, is main's ``ncclep`` backend only), nor does
torchtitan 0.3.0 (``use_fp8_dispatch`` defaults off and nothing sets it). DeepSeek-V3's own framework
dispatches FP8 (1 + 4/128 bytes, its report §3.3.2); a plan cannot ask for it."""


def _dispatch(ctx: LayerContext) -> tuple[DispatchCopies, GroupGeometry]:
    model, p, cluster = ctx.model, ctx.parallel, ctx.cluster
    geo = group_geometry(p, MeshAxis.EP, cluster.num_gpus_per_node)
    remote_fraction = None
    if p.dispatcher.topology_aware_routing and geo.crosses_nodes:
        remote_fraction = topology_aware_remote_fraction(
            geo.size,
            geo.ranks_per_node,
            cluster.links["intra_node"].collectives["all_to_all"].bandwidth_gbps,
            cluster.links["inter_node"].collectives["all_to_all"].bandwidth_gbps,
        )
    shape = RoutingShape(
        num_experts=model.num_experts or 1,
        topk=model.moe_router_topk or 1,
        ep=p.ep,
        ep_ranks_per_node=geo.ranks_per_node,
        tp=p.tp,
        tp_duplicates=p.tp > 1 and not p.sequence_parallel,
        capacity_factor=ctx.training.capacity_factor,
        num_groups=model.moe_router_num_groups or 1,
        group_topk=model.moe_router_group_topk or 1,
        remote_fraction=remote_fraction,
        condense_fraction=p.dispatcher.condense_fraction,
    )
    return dispatcher(p.dispatcher.kind).copies(shape), geo


def expert_comm(ctx: LayerContext, stages: LayerStages, terms: Terms, paired: bool = True) -> None:
    """Add one MoE layer's EP (and ETP) communication for one micro-batch; ``stages``: its compute,
    split as EP overlap schedules it (the communication fields are filled here). ``paired``: under EP
    overlap, a pass paired with another micro-batch's (the pipeline's steady state); else a warm-up
    forward and a cool-down backward, each run alone (``ep_overlap.unpaired_exposed_seconds``)."""
    model, p, cluster = ctx.model, ctx.parallel, ctx.cluster
    kind = dispatcher(p.dispatcher.kind)
    h = model.hidden_size
    dispatch = combine = redo = 0.0  # one way each; redo: the forward's again under MoE recompute
    if p.ep > 1:
        copies, geo = _dispatch(ctx)
        per_token = ctx.tokens * ctx.imbalance * h * DISPATCH_BYTES
        saved = 0.0
        if p.dispatcher.sequence_migration:
            saved = migration_saved_fraction(ctx.training.seq_len * (model.moe_router_topk or 1), p.ep)
        one_way = []
        for keep in (1.0, 1.0 - saved):  # dispatch, then combine
            intra = copies.intra_node * per_token * keep
            inter = copies.inter_node * per_token * keep
            gather = copies.tp_allgather * per_token
            seconds = kind.one_way_seconds(cluster, intra, inter, gather, p.dispatcher.num_chunks)
            one_way.append(seconds / kind.bandwidth_share(p.dispatcher))
            for link, amount in (("intra_node", intra + gather), ("inter_node", inter)):
                terms.add_bytes(link, 2 * amount)  # forward and backward
        dispatch, combine = one_way
        if "moe" in p.effective_recompute_modules or p.recompute == "full":
            redo = dispatch + combine
    if p.etp > 1:
        # ETP: all-gather the routed tokens before the sharded experts and reduce-scatter after them
        # (Megatron's alltoall dispatcher), unless the dispatcher already rebuilt the tokens (MoNTA).
        geo_etp = group_geometry(p, MeshAxis.ETP, cluster.num_gpus_per_node)
        routed = ctx.tokens * ctx.imbalance * (model.moe_router_topk or 1) * h * 2 * p.etp
        etp_time = 0.0
        for collective in kind.etp_collectives:  # each forward and backward
            etp_time += comm.ring_time(cluster, collective, routed, geo_etp)
            for link, amount in comm.ring_bytes(collective, routed, geo_etp).items():
                terms.add_bytes(link, 2 * amount)
        # The all-gather follows the dispatch and the reduce-scatter precedes the combine.
        dispatch, combine = dispatch + etp_time / 2, combine + etp_time / 2
    time = 2 * (dispatch + combine) + redo
    if time == 0.0:
        return
    link = (
        "inter_node"
        if p.ep > 1 and group_geometry(p, MeshAxis.EP, cluster.num_gpus_per_node).crosses_nodes
        else "intra_node"
    )
    if p.a2a_overlap:
        sm_share = kind.comm_sms(p.dispatcher) / (cluster.gpu.num_sms or 132)
        full = replace(
            stages,
            dispatch_fwd=dispatch,
            combine_fwd=combine,
            dispatch_bwd=dispatch + redo,
            combine_bwd=combine,
        )
        if paired:
            terms.add("ep_dispatch_combine", time, exposed_seconds(full), link=link)
            terms.add("ep_overlap_sm_cost", min(time, stages.compute) * sm_share)
        else:  # no other micro-batch's compute runs beside it: no SMs lent either
            terms.add("ep_dispatch_combine", time, unpaired_exposed_seconds(full), link=link)
    else:
        terms.add("ep_dispatch_combine", time, link=link)
