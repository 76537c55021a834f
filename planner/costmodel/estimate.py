"""``estimate(model, training, parallel, cluster) -> Estimate``: step time, memory and traffic of one plan.

Composition (each term on ``Estimate.breakdown``, with its total and its exposed time):

1. Per micro-batch, per pipeline rank, per layer: GEMMs, fused attention and element-wise kernels
   (``compute.py``) and FP8 quantisation of GEMM operands; recompute adds its forward work; TP
   all-gather/reduce-scatter (with SP) or all-reduce, CP key/value exchange, EP dispatch/combine and
   ETP all-gather (``comm.py``, ``traffic.py``) on the groups placed by ``layout.py``. A layer whose
   kernels the host launches slower than the GPU runs them is host-bound: ``host_launch_bound`` adds
   the difference.
2. Overlap: TP collectives are exposed (no ``--tp-comm-overlap``). EP communication is exposed unless
   ``a2a_overlap`` (Megatron's ``--overlap-moe-expert-parallel-comm``, or DualPipe) hides it behind the
   compute of the paired micro-batch: exposed ``max(0, T_ep - T_compute)``, and the overlapped compute
   slows by the share of SMs the communication kernels hold (seeds §6.4). CP exchange hides behind
   attention. PP sends are exposed with 1F1B and hidden with interleaving (Megatron overlaps p2p with VPP).
3. Pipeline: ``T = m * t_rank + (pp-1) * t_chunk`` with m micro-batches, t_rank the busiest rank's time
   per micro-batch and t_chunk the largest pipeline chunk's: the pipeline fills and drains one chunk at
   a time, so with equal chunks the bubble is Narayanan et al.'s ``(pp-1)/vpp`` micro-batch times
   (1F1B and interleaved 1F1B, 2021 §2.2) and with the solver's uneven chunks the largest one sets it.
4. Data parallel: gradient reduce-scatter (FP32) and parameter all-gather (BF16) over DP x CP for
   dense and EDP for expert parameters (all-reduce without the distributed optimizer), overlapped with
   the backward of the last and the forward of the first micro-batch; FSDP gathers each layer's weights
   in forward and backward and reduce-scatters its gradients, overlapped with that layer's compute.
5. Optimizer: Adam over the local shard, memory-bound (``OPTIMIZER_BYTES_PER_PARAM``).
6. Step overhead: a profile's ``step_overhead_s`` (0 unless ``moeplan calibrate`` fitted it to runs),
   host time per step outside every priced kernel and collective.

Routing: ``balanced`` sends the mean load to every expert; ``dropless`` adds the expected excess of
the busiest rank under random routing (``routing_imbalance``); ``capacity`` caps it at the factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from planner.costmodel import comm, compute
from planner.costmodel.compute import host_bound_excess
from planner.costmodel.flops import (
    LayerFlops,
    layer_flops,
    model_flops_per_token,
    mtp_flops,
    output_layer_flops,
    recompute_flops,
)
from planner.costmodel.geometry import GroupGeometry, group_geometry
from planner.costmodel.memory import (
    MemoryCoefficients,
    memory_coefficients,
    rank_memory,
    ranks_of,
    split_chunks,
)
from planner.costmodel.params import count_params
from planner.costmodel.routing import (
    DispatchCopies,
    dispatch_copies,
    expected_max_normal,
    migration_saved_fraction,
    topology_aware_remote_fraction,
)
from planner.schema import (
    ClusterProfile,
    CollectiveKind,
    CostTerm,
    Estimate,
    MeshAxis,
    ModelSpec,
    ParallelConfig,
    TrainingSpec,
)
from planner.units import GIB

__all__ = [
    "COMM_SMS",
    "OPTIMIZER_BYTES_PER_PARAM",
    "LayerCache",
    "LayoutCosts",
    "OverlappedTerm",
    "estimate",
    "evaluate",
    "layout_costs",
    "layout_imbalance",
    "routing_imbalance",
]

OPTIMIZER_BYTES_PER_PARAM = 34
"""Adam step traffic per local parameter: read FP32 gradient, master weight, m, v (16 B), write master,
m, v (12 B), write the BF16 weight (2 B), plus zeroing the gradient buffer (4 B)."""

COMM_SMS = {
    "hierarchical-deepep": 20,
    "hierarchical-hybridep": 8,
    "alltoall": 16,
    "allgather": 16,
    "monta": 16,
}
"""SMs a dispatcher's kernels hold while overlapped: DeepEP 20 (DeepSeek-V3 report §3.2.2), Hybrid-EP 8
(multi-node default, deepseek-ai/DeepEP hybrid-ep docs); NCCL 16 (assumed: NCCL's channel count on
NVSwitch systems; not measured here)."""

FP8_DISPATCH_BYTES = 1 + 4 / 128
"""Bytes per element of an FP8 dispatch with one FP32 scale per 128 values (DeepEP, seeds §6.0)."""


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


@dataclass
class _Terms:
    """Per-micro-batch time of one pipeline rank, by term: (total, exposed) seconds."""

    items: dict[str, list[float]] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    bytes: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, total: float, exposed: float | None = None, link: str | None = None) -> None:
        entry = self.items.setdefault(name, [0.0, 0.0])
        entry[0] += total
        entry[1] += total if exposed is None else exposed
        if link:
            self.links[name] = link

    def add_bytes(self, link: str, amount: float) -> None:
        self.bytes[link] = self.bytes.get(link, 0.0) + amount

    def exposed(self) -> float:
        return sum(exposed for _, exposed in self.items.values())


@dataclass(frozen=True, slots=True)
class _Context:
    model: ModelSpec
    training: TrainingSpec
    parallel: ParallelConfig
    cluster: ClusterProfile
    tokens: float
    """Tokens per rank per micro-batch (the sequence-parallel share)."""
    gathered: float
    """Tokens of a TP group's gathered sequence per micro-batch."""
    imbalance: float


def _gemm_kernels(model: ModelSpec, moe: bool) -> int:
    attention = (5 if model.mla.q_lora_rank else 4) if model.attention == "mla" and model.mla else 2
    if not moe:
        return attention + 2
    return attention + 1 + 2 + (2 if model.shared_expert_ffn_hidden_size else 0)


def _layer(ctx: _Context, lf: LayerFlops, moe: bool, terms: _Terms) -> float:
    """Add one layer's terms for one micro-batch; return its compute time (what overlap can hide behind)."""
    model, p, gpu, prec = ctx.model, ctx.parallel, ctx.cluster.gpu, ctx.training.precision
    rho = p.dispatcher.condense_fraction
    routed = lf.routed_experts * ctx.imbalance * (1 - rho)
    gemm_flops = (lf.attn_proj + lf.dense_ffn + lf.router + lf.shared_experts + routed) * ctx.tokens
    kernels = _gemm_kernels(model, moe)
    gemm = compute.gemm_time(gemm_flops, kernels, gpu, prec) + compute.gemm_time(
        2 * gemm_flops, 2 * kernels, gpu, prec
    )
    att_fwd, att_bwd = compute.attention_time(lf.core_attn * ctx.tokens, gpu)
    elements = compute.elementwise_elements(model, moe)
    ew = compute.memory_time(3 * sum(elements.values()) * ctx.tokens * 2, gpu)
    terms.add("gemm", gemm)
    terms.add("attention", att_fwd + att_bwd)
    if moe and p.dispatcher.sequence_migration and p.ep > 1:
        # Migrated sequences land on random ranks: the busiest rank's attention grows with the expected
        # maximum of mbs-per-rank sequence counts (Luffy eq. 1 prices attention per sequence).
        extra = routing_imbalance(float(p.micro_batch), p.ep) - 1.0
        terms.add("migration_attention_imbalance", (att_fwd + att_bwd) * extra)
    terms.add("elementwise", ew)
    busy = gemm + att_fwd + att_bwd + ew
    if prec in ("fp8", "mxfp8"):
        quantize = compute.memory_time(
            compute.FP8_QUANTIZE_BYTES * compute.fp8_quantized_elements(model, moe) * ctx.tokens, gpu
        )
        terms.add("fp8_quantize", quantize)
        busy += quantize

    extra_flops = recompute_flops(lf, p)
    if extra_flops:
        core = (
            lf.core_attn if (p.recompute == "full" or "core_attn" in p.effective_recompute_modules) else 0.0
        )
        recompute = compute.gemm_time((extra_flops - core) * ctx.tokens, kernels, gpu, prec)
        recompute += compute.attention_time(core * ctx.tokens, gpu)[0]
        modules = set(p.effective_recompute_modules)
        redo = sum(v for k, v in elements.items() if p.recompute == "full" or k in modules)
        recompute += compute.memory_time(redo * ctx.tokens * 2, gpu)
        terms.add("recompute", recompute)
        busy += recompute
    elif p.effective_recompute_modules:
        redo = sum(v for k, v in elements.items() if k in set(p.effective_recompute_modules))
        recompute = compute.memory_time(redo * ctx.tokens * 2, gpu)
        terms.add("recompute", recompute)
        busy += recompute

    _tp_comm(ctx, moe, terms)
    if moe and model.is_moe:
        _ep_comm(ctx, busy, terms)
    if p.cp > 1:
        _cp_comm(ctx, att_fwd + att_bwd, terms)
    _host_bound(ctx, moe, terms)
    return busy


def _host_bound(ctx: _Context, moe: bool, terms: _Terms) -> None:
    """Launch-bound time of one layer per micro-batch: its kernels' host time beyond its GPU time."""
    model, p = ctx.model, ctx.parallel
    local_experts = max((model.num_experts or 1) // p.ep, 1)
    python, looped = compute.layer_kernels(
        model,
        moe and model.is_moe,
        p.dispatcher.kind,
        local_experts,
        p.tp,
        ctx.training.precision in ("fp8", "mxfp8"),
    )
    python_launches = compute.HOST_PASSES * python + compute.recompute_kernels(
        model, moe and model.is_moe, p.effective_recompute_modules, p.recompute == "full", python
    )
    host_us = python_launches * compute.host_us_per_kernel(ctx.cluster)
    host_us += compute.HOST_PASSES * looped * ctx.cluster.host_overhead_us
    excess = host_bound_excess(terms.exposed(), host_us * 1e-6)
    if excess:
        terms.add("host_launch_bound", excess)


def _tp_comm(ctx: _Context, moe: bool, terms: _Terms) -> None:
    p = ctx.parallel
    if p.tp == 1:
        return
    geo = group_geometry(p, MeshAxis.TP, ctx.cluster.num_gpus_per_node)
    full = ctx.gathered * ctx.model.hidden_size * 2
    # Collectives per layer and direction: attention in and out, FFN in and out (shared experts in MoE).
    pairs = 1 + (1 if (not moe or ctx.model.shared_expert_ffn_hidden_size) else 0)
    if p.sequence_parallel:
        time = (
            2
            * pairs
            * (
                comm.ring_time(ctx.cluster, "all_gather", full, geo)
                + comm.ring_time(ctx.cluster, "reduce_scatter", full, geo)
            )
        )
        moved = 2 * pairs * 2 * full * (p.tp - 1) / p.tp
    else:
        time = 2 * pairs * comm.ring_time(ctx.cluster, "all_reduce", full, geo)
        moved = 2 * pairs * 2 * full * (p.tp - 1) / p.tp
    link = "inter_node" if geo.crosses_nodes else "intra_node"
    terms.add("tp_comm", time, link=link)
    terms.add_bytes(link, moved)


def _dispatch(ctx: _Context) -> tuple[DispatchCopies, GroupGeometry]:
    model, p, cluster = ctx.model, ctx.parallel, ctx.cluster
    geo = group_geometry(p, MeshAxis.EP, cluster.num_gpus_per_node)
    kind = p.dispatcher.kind
    remote_fraction = None
    if p.dispatcher.topology_aware_routing and geo.crosses_nodes:
        remote_fraction = topology_aware_remote_fraction(
            geo.size,
            geo.ranks_per_node,
            cluster.links["intra_node"].collectives["all_to_all"].bandwidth_gbps,
            cluster.links["inter_node"].collectives["all_to_all"].bandwidth_gbps,
        )
    copies = dispatch_copies(
        kind,
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
    return copies, geo


def _ep_comm(ctx: _Context, busy: float, terms: _Terms) -> None:
    model, p, cluster = ctx.model, ctx.parallel, ctx.cluster
    h = model.hidden_size
    time = 0.0
    if p.ep > 1:
        copies, geo = _dispatch(ctx)
        fp8 = ctx.training.precision in ("fp8", "mxfp8") and p.dispatcher.kind == "hierarchical"
        dispatch_b, combine_b = (FP8_DISPATCH_BYTES if fp8 else 2.0), 2.0
        per_token = ctx.tokens * ctx.imbalance * h
        saved = 0.0
        if p.dispatcher.sequence_migration:
            saved = migration_saved_fraction(ctx.training.seq_len * (model.moe_router_topk or 1), p.ep)
        one_way = []
        for width, keep in ((dispatch_b, 1.0), (combine_b, 1.0 - saved)):
            intra = copies.intra_node * per_token * width * keep
            inter = copies.inter_node * per_token * width * keep
            t = comm.link_time(cluster, "all_to_all", intra, inter)
            if copies.tp_allgather:  # monta: TP all-gather pipelined with the all-to-all in chunks
                ag_bytes = copies.tp_allgather * per_token * width
                t = _monta_pipeline(cluster, t, intra, inter, ag_bytes, p.dispatcher.num_chunks)
                terms.add_bytes("intra_node", 2 * ag_bytes)
            one_way.append(t)
            terms.add_bytes("intra_node", 2 * intra)  # forward and backward
            terms.add_bytes("inter_node", 2 * inter)
        time = 2 * sum(one_way)  # dispatch + combine, forward and backward
        if "moe" in p.effective_recompute_modules or p.recompute == "full":
            time += sum(one_way)
    if p.etp > 1:
        # ETP: all-gather the routed tokens before the sharded experts and reduce-scatter after them
        # (Megatron's alltoall dispatcher). MoNTA's pipelined all-gather already rebuilt the tokens.
        geo_etp = group_geometry(p, MeshAxis.ETP, cluster.num_gpus_per_node)
        routed = ctx.tokens * ctx.imbalance * (model.moe_router_topk or 1) * h * 2 * p.etp
        kinds: tuple[CollectiveKind, ...] = ("reduce_scatter",) if p.dispatcher.kind == "monta" else (
            "all_gather", "reduce_scatter",
        )  # fmt: skip
        etp_time = 0.0
        for kind in kinds:  # each forward and backward
            etp_time += comm.ring_time(cluster, kind, routed, geo_etp)
            for link, amount in comm.ring_bytes(kind, routed, geo_etp).items():
                terms.add_bytes(link, 2 * amount)
        time += 2 * etp_time
    if time == 0.0:
        return
    link = (
        "inter_node"
        if p.ep > 1 and group_geometry(p, MeshAxis.EP, cluster.num_gpus_per_node).crosses_nodes
        else "intra_node"
    )
    if p.a2a_overlap:
        key = f"{p.dispatcher.kind}-{p.dispatcher.backend}" if p.dispatcher.backend else p.dispatcher.kind
        sm_share = COMM_SMS.get(key, 16) / (cluster.gpu.num_sms or 132)
        exposed = max(0.0, time - busy)
        terms.add("ep_dispatch_combine", time, exposed, link=link)
        terms.add("ep_overlap_sm_cost", min(time, busy) * sm_share)
    else:
        terms.add("ep_dispatch_combine", time, link=link)


def _monta_pipeline(
    cluster: ClusterProfile, a2a: float, intra: float, inter: float, ag_bytes: float, chunks: int
) -> float:
    """MoNTA's chunked overlap of the all-to-all with the TP all-gather (seeds §1.3, §6.5).

    ``T(n) = (T_a2a + T_ag)/n + (n-1) max(T_a2a, T_ag)/n + n alpha``, and never below the time the
    NVLink needs for the bytes both steps put on it (the link-sharing bound).
    """
    fit = cluster.links["intra_node"].collectives["all_gather"]
    alpha = fit.latency_us * 1e-6
    ag = ag_bytes / (fit.bandwidth_gbps * 1e9)
    a2a_wire = max(0.0, a2a - alpha)
    n = max(chunks, 1)
    pipelined = (a2a_wire + ag) / n + (n - 1) * max(a2a_wire, ag) / n + n * 2 * alpha
    shared_link = (intra + ag_bytes) / (
        cluster.links["intra_node"].collectives["all_to_all"].bandwidth_gbps * 1e9
    )
    return max(pipelined, shared_link)


def _cp_comm(ctx: _Context, attention: float, terms: _Terms) -> None:
    p, model = ctx.parallel, ctx.model
    geo = group_geometry(p, MeshAxis.CP, ctx.cluster.num_gpus_per_node)
    # Each TP rank exchanges the key/value heads it holds (groups / tp; a group replicated when tp exceeds
    # the groups), in its own CP ring: the bundled runtime's counts checked this (cp_kv_all_gather).
    kv_heads = max(model.query_groups / p.tp, 1.0)
    kv = ctx.gathered * 2 * kv_heads * model.head_dim * 2
    time = 3 * (p.cp - 1) * comm.p2p_time(ctx.cluster, kv, geo.crosses_nodes)  # forward once, backward twice
    link = "inter_node" if geo.crosses_nodes else "intra_node"
    terms.add("cp_kv_exchange", time, max(0.0, time - attention), link)
    terms.add_bytes(link, 3 * (p.cp - 1) * kv)


def _merge(into: _Terms, sub: _Terms, times: int) -> None:
    for name, (total, exposed) in sub.items.items():
        into.add(name, total * times, exposed * times, sub.links.get(name))
    for link, amount in sub.bytes.items():
        into.add_bytes(link, amount * times)


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


def _data_parallel_terms(ctx: _Context, num_microbatches: int) -> list[OverlappedTerm]:
    """Gradient reduction and parameter gathering per step (or per layer with FSDP).

    Megatron overlaps the gradient reduce-scatter with the backward of the last micro-batch (2/3 of a
    micro-batch's time) and the parameter all-gather with the forward of the first (1/3); FSDP
    prefetches each layer's weights behind the previous layer's compute.
    """
    model, p, cluster = ctx.model, ctx.parallel, ctx.cluster
    counts = count_params(model)
    dense_local = (counts.total - counts.routed_experts) / (p.tp * p.pp)
    expert_local = counts.routed_experts / (p.ep * p.etp * p.pp)
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
            comm.ring_time(cluster, "all_gather", 2 * dense_local / layers, dp_geo)
            + comm.ring_time(cluster, "all_gather", 2 * expert_local / layers, edp_geo)
        )
        one += comm.ring_time(cluster, "reduce_scatter", 4 * dense_local / layers, dp_geo)
        one += comm.ring_time(cluster, "reduce_scatter", 4 * expert_local / layers, edp_geo)
        # per layer and micro-batch: max(0, one - t_rank / layers); summed: max(0, total - m * t_rank)
        total = one * layers * num_microbatches
        sent = _sum_bytes(
            comm.ring_bytes("all_gather", gathers * 2 * dense_local, dp_geo),
            comm.ring_bytes("all_gather", gathers * 2 * expert_local, edp_geo),
            comm.ring_bytes("reduce_scatter", 4 * dense_local, dp_geo),
            comm.ring_bytes("reduce_scatter", 4 * expert_local, edp_geo),
        )
        sent = {link: amount * num_microbatches for link, amount in sent.items()}
        return [
            OverlappedTerm(
                "fsdp_gather_scatter", total, float(num_microbatches), _link(dp_geo), tuple(sent.items())
            )
        ]
    kind: CollectiveKind = "reduce_scatter" if p.distributed_optimizer else "all_reduce"
    rs = comm.ring_time(cluster, kind, 4 * dense_local, dp_geo) + comm.ring_time(
        cluster, kind, 4 * expert_local, edp_geo
    )
    ag = 0.0
    if p.distributed_optimizer:
        ag = comm.ring_time(cluster, "all_gather", 2 * dense_local, dp_geo) + comm.ring_time(
            cluster, "all_gather", 2 * expert_local, edp_geo
        )
    reduced = _sum_bytes(
        comm.ring_bytes(kind, 4 * dense_local, dp_geo), comm.ring_bytes(kind, 4 * expert_local, edp_geo)
    )
    gathered = (
        _sum_bytes(
            comm.ring_bytes("all_gather", 2 * dense_local, dp_geo),
            comm.ring_bytes("all_gather", 2 * expert_local, edp_geo),
        )
        if p.distributed_optimizer
        else {}
    )
    return [
        OverlappedTerm("dp_grad_reduce", rs, 2 / 3, _link(dp_geo), tuple(reduced.items())),
        OverlappedTerm("dp_param_all_gather", ag, 1 / 3, _link(dp_geo), tuple(gathered.items())),
    ]


def _sum_bytes(*parts: dict[str, float]) -> dict[str, float]:
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


def _layer_terms(ctx: _Context, moe: bool) -> _Terms:
    """Terms of one layer for one micro-batch."""
    terms = _Terms()
    _layer(ctx, layer_flops(ctx.model, ctx.training.seq_len, moe=moe), moe, terms)
    return terms


def _head_terms(ctx: _Context) -> _Terms:
    """Output layer, loss and MTP modules, on the last pipeline rank, per micro-batch."""
    model, gpu, prec = ctx.model, ctx.cluster.gpu, ctx.training.precision
    head = (output_layer_flops(model) + mtp_flops(model, ctx.training.seq_len)) * ctx.tokens
    kernels = 1 + model.mtp_num_layers * 8
    t = compute.gemm_time(head, kernels, gpu, prec) + compute.gemm_time(2 * head, 2 * kernels, gpu, prec)
    t += compute.memory_time(3 * ctx.gathered / ctx.parallel.tp * model.vocab_size * 6, gpu)  # softmax + loss
    terms = _Terms()
    terms.add("output_layer_and_mtp", t)
    return terms


def _p2p_terms(ctx: _Context) -> _Terms:
    """Pipeline sends of one rank per micro-batch (forward activations, backward gradients, per chunk)."""
    p = ctx.parallel
    terms = _Terms()
    if p.pp > 1:
        geo = group_geometry(p, MeshAxis.PP, ctx.cluster.num_gpus_per_node)
        size = ctx.tokens * ctx.model.hidden_size * 2
        t = 2 * p.vpp * comm.p2p_time(ctx.cluster, size, geo.crosses_nodes)
        link = "inter_node" if geo.crosses_nodes else "intra_node"
        terms.add("pp_p2p", t, 0.0 if p.vpp > 1 else t, link=link)
        terms.add_bytes(link, 2 * p.vpp * size)
    return terms


@dataclass(frozen=True, slots=True)
class LayoutCosts:
    """Everything a layout's step time and memory depend on, as coefficients of the layers per rank.

    Rank r holding d dense and e MoE layers takes ``d*dense + e*moe + p2p (+ head on the last rank)``
    seconds per micro-batch; the step takes ``m * max_r t_r + (pp - 1) * max_c t_c`` (the pipeline
    fills and drains one chunk at a time, so the largest chunk sets the bubble; with equal chunks this
    is Narayanan et al.'s ``(pp - 1)/vpp`` micro-batch times) plus the data-parallel terms
    (each ``max(0, total - share * t)``) and the optimizer step of the rank with the most optimizer
    state. ``evaluate`` computes exactly this; the solver's ILP encodes the same expressions.
    """

    context: _Context
    dense: _Terms
    moe: _Terms
    head: _Terms
    p2p: _Terms
    num_microbatches: int
    bubble: float
    """Chunk times in the pipeline bubble: pp - 1."""
    memory: MemoryCoefficients

    dense_s: float = 0.0
    """Exposed seconds of one dense layer per micro-batch (``dense.exposed()``, kept for the hot loop)."""
    moe_s: float = 0.0
    head_s: float = 0.0
    p2p_s: float = 0.0

    def chunk_seconds(self, chunk: int, dense: int, moe: int) -> float:
        """Seconds of one micro-batch through one chunk (the last chunk carries the output layer)."""
        p = self.context.parallel
        last = chunk == p.pp * p.vpp - 1
        return dense * self.dense_s + moe * self.moe_s + self.p2p_s / p.vpp + (self.head_s if last else 0.0)

    def rank_seconds(self, rank: int, dense: int, moe: int) -> float:
        """Seconds of one micro-batch on pipeline rank ``rank``."""
        last = rank == self.context.parallel.pp - 1
        return dense * self.dense_s + moe * self.moe_s + self.p2p_s + (self.head_s if last else 0.0)

    data_parallel: tuple[OverlappedTerm, ...] = ()
    """Gradient and parameter collectives, hidden behind compute up to their slope times t_rank."""

    def optimizer_seconds(self, optimizer_bytes: float) -> float:
        """Adam step over the local shard whose FP32 states take ``optimizer_bytes``."""
        return compute.memory_time(
            OPTIMIZER_BYTES_PER_PARAM * optimizer_bytes / 12.0, self.context.cluster.gpu
        )


LayerCache = dict[tuple[object, ...], tuple[_Terms, _Terms, _Terms]]
"""Per-layer terms shared by layouts that differ only in PP, VPP and data parallelism."""


def _layer_key(p: ParallelConfig) -> tuple[object, ...]:
    # Everything the per-layer terms depend on: the pipeline and data-parallel degrees do not enter
    # them (their groups' strides are set by tp, cp, etp and ep alone).
    return (p.tp, p.cp, p.ep, p.etp, p.micro_batch, p.sequence_parallel, p.recompute, p.recompute_modules,
            p.dispatcher, p.a2a_overlap)  # fmt: skip


def layout_costs(
    model: ModelSpec,
    training: TrainingSpec,
    parallel: ParallelConfig,
    cluster: ClusterProfile,
    cache: LayerCache | None = None,
    memory: MemoryCoefficients | None = None,
) -> LayoutCosts:
    """Per-layer costs of a layout, independent of how layers are assigned to pipeline stages.

    ``cache`` (one dict per model, training and cluster) reuses the per-layer terms across layouts.
    """
    p = parallel
    cluster = compute.sustained_cluster(cluster)
    gathered = p.micro_batch * training.seq_len / p.cp
    tokens = gathered / p.tp
    ctx = _Context(model, training, p, cluster, tokens, gathered, layout_imbalance(model, training, p))
    key = _layer_key(p)
    if cache is not None and key in cache:
        dense, moe, head = cache[key]
    else:
        dense = _layer_terms(ctx, moe=False)
        moe = _layer_terms(ctx, moe=True) if model.is_moe else _Terms()
        head = _head_terms(ctx)
        if cache is not None:
            cache[key] = (dense, moe, head)
    p2p = _p2p_terms(ctx)
    return LayoutCosts(
        context=ctx,
        dense=dense,
        moe=moe,
        head=head,
        p2p=p2p,
        num_microbatches=max(1, training.global_batch // (p.micro_batch * p.dp)),
        bubble=float(p.pp - 1),
        memory=memory or memory_coefficients(model, training, p, ctx.imbalance),
        dense_s=dense.exposed(),
        moe_s=moe.exposed(),
        head_s=head.exposed(),
        p2p_s=p2p.exposed(),
        data_parallel=tuple(
            _data_parallel_terms(ctx, max(1, training.global_batch // (p.micro_batch * p.dp)))
        ),
    )


def evaluate(costs: LayoutCosts, chunks: list[tuple[int, int]]) -> Estimate:
    """The estimate of a layout with (dense, moe) layers per pipeline chunk (pp*vpp chunks, in order)."""
    ctx = costs.context
    model, training, p, cluster = ctx.model, ctx.training, ctx.parallel, ctx.cluster
    ranks = ranks_of(chunks, p.pp)
    seconds = [costs.rank_seconds(r, d, m) for r, (d, m) in enumerate(ranks)]
    busiest_rank = max(range(len(ranks)), key=lambda r: seconds[r])
    t_rank = seconds[busiest_rank]
    busiest = _Terms()
    dense, moe = ranks[busiest_rank]
    _merge(busiest, costs.dense, dense)
    _merge(busiest, costs.moe, moe)
    _merge(busiest, costs.p2p, 1)
    if busiest_rank == p.pp - 1:
        _merge(busiest, costs.head, 1)
    mb = costs.num_microbatches
    bubble = costs.bubble * max(costs.chunk_seconds(c, d, m) for c, (d, m) in enumerate(chunks))
    breakdown = [
        CostTerm(name=name, total_s=total * mb, exposed_s=exposed * mb, link_class=busiest.links.get(name))
        for name, (total, exposed) in sorted(busiest.items.items())
    ]
    breakdown.append(CostTerm(name="pipeline_bubble", total_s=bubble, exposed_s=bubble))
    breakdown.extend(term.cost(t_rank) for term in costs.data_parallel)
    memories = [rank_memory(costs.memory, r, d, m) for r, (d, m) in enumerate(ranks)]
    optimizer = max(costs.optimizer_seconds(memory.optimizer) for memory in memories)
    breakdown.append(CostTerm(name="optimizer_step", total_s=optimizer, exposed_s=optimizer))
    if cluster.step_overhead_s:  # a calibrated profile's fixed host time per step
        breakdown.append(
            CostTerm(name="step_overhead", total_s=cluster.step_overhead_s, exposed_s=cluster.step_overhead_s)
        )
    peak = max(memory.total for memory in memories)

    world = p.tp * p.cp * p.pp * p.dp
    step = sum(term.exposed_s for term in breakdown)
    tokens_per_step = training.global_batch * training.seq_len
    model_flops = model_flops_per_token(model, training.seq_len) * tokens_per_step
    tflops = model_flops / (step * world) / 1e12 if step > 0 else 0.0
    peak_tflops = cluster.gpu.peak_tflops.bf16 or cluster.gpu.peak_tflops.fp16 or 1.0
    return Estimate(
        step_time_s=step,
        tokens_per_s_per_gpu=tokens_per_step / (step * world) if step > 0 else 0.0,
        model_tflops_per_gpu=tflops,
        mfu=tflops / peak_tflops,
        peak_memory_bytes=peak,
        fits=peak <= cluster.gpu.hbm_gib * GIB,
        breakdown=tuple(breakdown),
        bytes_per_link_class={link: amount * mb for link, amount in sorted(busiest.bytes.items())},
        gradient_bytes_per_link_class=dict(
            sorted(_sum_bytes(*(dict(term.bytes_per_link_class) for term in costs.data_parallel)).items())
        ),
    )


def estimate(
    model: ModelSpec, training: TrainingSpec, parallel: ParallelConfig, cluster: ClusterProfile
) -> Estimate:
    """Predicted step time, throughput, memory and traffic. Never raises for an infeasible plan:
    feasibility is ``planner.feasibility``'s job; memory that does not fit is ``fits=False``."""
    return evaluate(layout_costs(model, training, parallel, cluster), split_chunks(model, parallel))
