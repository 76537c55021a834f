"""One layer's terms for one micro-batch on one rank: GEMMs, attention, element-wise kernels, FP8
quantisation, recompute, TP and CP communication, EP communication (``expert_comm``) and the
host-launch bound; the output layer and pipeline sends, per micro-batch.

TP collectives are exposed, or overlapped with their GEMMs under ``tp_comm_overlap`` (``_tp_comm``); CP's
key/value exchange hides behind attention; PP sends are exposed with 1F1B and hidden with interleaving
(Megatron overlaps p2p with VPP).
"""

from __future__ import annotations

from planner.costmodel import comm, compute
from planner.costmodel.compute import host_bound_excess
from planner.costmodel.dispatchers import UNFUSED_ROUTER_KERNELS, dispatcher
from planner.costmodel.ep_overlap import LayerStages
from planner.costmodel.expert_comm import expert_comm
from planner.costmodel.flops import LayerFlops, layer_flops, mtp_flops, output_layer_flops, recompute_flops
from planner.costmodel.geometry import group_geometry
from planner.costmodel.routing import routing_imbalance
from planner.costmodel.terms import LayerContext, Terms
from planner.schema import MeshAxis, ModelSpec

__all__ = ["head_terms", "layer_terms", "p2p_terms"]

UNFUSED_SCORE_FORWARD_BYTES = 8.0
"""HBM bytes per score element of unfused attention's forward: Q K^T writes it (BF16), the fused
scale-mask-softmax reads it and writes the probabilities, ``probs @ V`` reads them."""
UNFUSED_SCORE_TRAFFIC_BYTES = UNFUSED_SCORE_FORWARD_BYTES + 12.0
"""Forward and backward: the backward writes dprobs, reads the probabilities and dprobs, writes the score
gradients, which the two GEMMs for dQ and dK read."""


def _gemm_kernels(model: ModelSpec, moe: bool) -> int:
    attention = (5 if model.mla.q_lora_rank else 4) if model.attention == "mla" and model.mla else 2
    if not moe:
        return attention + 2
    return attention + 1 + 2 + (2 if model.shared_expert_ffn_hidden_size else 0)


def _routed_activation(model: ModelSpec, elements: dict[str, float]) -> float:
    """The routed experts' part of ``moe_act``'s elements per token (the shared experts' runs before the
    dispatch): their share of the activated widths."""
    act = elements.get("moe_act", 0.0)
    if not act:
        return 0.0
    routed = (model.moe_router_topk or 1) * model.expert_ffn_hidden_size
    return act * routed / (routed + model.shared_expert_ffn_hidden_size)


def _layer(ctx: LayerContext, lf: LayerFlops, moe: bool, terms: Terms, paired: bool = True) -> float:
    """Add one layer's terms for one micro-batch; return its compute time (what overlap can hide behind).
    ``paired``: see ``expert_comm``."""
    model, p, gpu, prec = ctx.model, ctx.parallel, ctx.cluster.gpu, ctx.training.precision
    rho = p.dispatcher.condense_fraction
    routed = lf.routed_experts * ctx.imbalance * (1 - rho)
    gemm_flops = (lf.attn_proj + lf.dense_ffn + lf.router + lf.shared_experts + routed) * ctx.tokens
    kernels = _gemm_kernels(model, moe)
    gemm_fwd = compute.gemm_time(gemm_flops, kernels, gpu, prec)
    gemm_bwd = compute.gemm_time(2 * gemm_flops, 2 * kernels, gpu, prec)
    gemm = gemm_fwd + gemm_bwd
    att_fwd, att_bwd = compute.attention_time(lf.core_attn * ctx.tokens, gpu)
    elements = compute.elementwise_elements(model, moe)
    if p.tp > 1 and not p.sequence_parallel:
        # Without sequence parallelism every TP rank runs the norms and the residual adds (and dropout)
        # on the whole sequence (Korthikanti et al. 2022 §4.2.2: these parts "are replicated across the
        # tensor parallel group"); ``ctx.tokens`` is the sequence-parallel share.
        for replicated in ("layernorm", "residual"):
            elements[replicated] *= p.tp
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
    # What EP overlap pairs with the dispatch and combine (``ep_overlap``): the routed experts' GEMMs and
    # activation are the ``mlp`` stages, everything else (the shared experts too) runs before the dispatch;
    # forward takes a third of the element-wise traffic and backward two (``3 *`` above).
    routed_share = routed * ctx.tokens / gemm_flops if gemm_flops else 0.0
    routed_act = _routed_activation(model, elements)
    act_share = routed_act / sum(elements.values())
    mlp_fwd = gemm_fwd * routed_share + ew * act_share / 3
    mlp_bwd = gemm_bwd * routed_share + ew * act_share * 2 / 3
    pre_fwd = gemm_fwd + att_fwd + ew / 3 - mlp_fwd
    pre_bwd = gemm_bwd + att_bwd + ew * 2 / 3 - mlp_bwd
    if p.attention_backend == "unfused":
        # The score matrix through HBM (its GEMMs are priced as the fused kernel's FLOPs above).
        redone = p.recompute == "full" or "core_attn" in p.effective_recompute_modules
        per_score = UNFUSED_SCORE_TRAFFIC_BYTES + (UNFUSED_SCORE_FORWARD_BYTES if redone else 0.0)
        scores = ctx.tokens * model.num_attention_heads * ctx.training.seq_len
        unfused = compute.memory_time(per_score * scores, gpu)
        terms.add("attention_scores_unfused", unfused)
        busy += unfused
        forward = UNFUSED_SCORE_FORWARD_BYTES / per_score
        pre_fwd += unfused * forward
        pre_bwd += unfused * (1 - forward)
    if prec in ("fp8", "mxfp8"):
        quantize = compute.memory_time(
            compute.FP8_QUANTIZE_BYTES * compute.fp8_quantized_elements(model, moe) * ctx.tokens, gpu
        )
        terms.add("fp8_quantize", quantize)
        busy += quantize
        # Inputs quantised in forward, gradients and transposes in backward: shared as the GEMMs are.
        mlp_fwd += quantize * routed_share / 3
        mlp_bwd += quantize * routed_share * 2 / 3
        pre_fwd += quantize * (1 - routed_share) / 3
        pre_bwd += quantize * (1 - routed_share) * 2 / 3

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
        modules = set(p.effective_recompute_modules)
        redo = sum(v for k, v in elements.items() if k in modules)
        recompute = compute.memory_time(redo * ctx.tokens * 2, gpu)
        terms.add("recompute", recompute)
        busy += recompute
    if extra_flops or p.effective_recompute_modules:
        # The routed experts' activation is recomputed in their backward, the rest in the pre-dispatch
        # backward (a full or MoE recompute, which would redo the experts' GEMMs, is refused with EP overlap).
        redone = p.recompute == "full" or "moe_act" in p.effective_recompute_modules
        act = compute.memory_time(routed_act * ctx.tokens * 2, gpu) if redone else 0.0
        mlp_bwd += act
        pre_bwd += recompute - act

    _tp_comm(ctx, lf, moe, terms)
    if moe and model.is_moe:
        # Delayed, the weight gradients (half the backward GEMMs' work) leave their module's backward.
        wgrad = gemm_bwd / 2 if p.delay_wgrad_compute else 0.0
        stages = LayerStages(
            pre_dispatch_fwd=pre_fwd,
            pre_dispatch_bwd=pre_bwd - wgrad * (1 - routed_share),
            mlp_fwd=mlp_fwd,
            mlp_bwd=mlp_bwd - wgrad * routed_share,
            pre_dispatch_wgrad=wgrad * (1 - routed_share),
            mlp_wgrad=wgrad * routed_share,
        )
        expert_comm(ctx, stages, terms, paired)
    if p.cp > 1:
        _cp_comm(ctx, att_fwd + att_bwd, terms)
    _host_bound(ctx, moe, terms)
    return busy


def _host_bound(ctx: LayerContext, moe: bool, terms: Terms) -> None:
    """Launch-bound time of one layer per micro-batch: its kernels' host time beyond its GPU time."""
    model, p = ctx.model, ctx.parallel
    if "full_iteration" in p.cuda_graphs:
        return  # the host replays one graph a step: no layer waits on its launches
    local_experts = max((model.num_experts or 1) // p.ep, 1)
    router_kernels = dispatcher(p.dispatcher.kind).router_kernels
    if not p.moe_router_fusion:
        router_kernels += UNFUSED_ROUTER_KERNELS
    regions, looped = compute.layer_regions(
        model,
        moe and model.is_moe,
        router_kernels,
        local_experts,
        p.tp,
        ctx.training.precision in ("fp8", "mxfp8"),
    )
    python = sum(regions.values())
    if not p.grouped_gemm:
        # Megatron's SequentialMLP launches each local expert's GEMMs from Python, at the framework's cost.
        python, looped = python + looped, 0
    recomputed = compute.recompute_kernels(
        model, moe and model.is_moe, p.effective_recompute_modules, p.recompute == "full", python
    )
    captured, replays = compute.graphed_host_launches(regions, p.cuda_graphs)
    # Recompute runs inside the graphed regions as their backward does: the captured share goes with them.
    eager = 1.0 - captured / python
    python_launches = (compute.HOST_PASSES * python + recomputed) * eager + replays
    host_us = python_launches * compute.host_us_per_kernel(ctx.cluster)
    host_us += compute.HOST_PASSES * looped * ctx.cluster.host_overhead_us
    excess = host_bound_excess(terms.exposed(), host_us * 1e-6)
    if excess:
        terms.add("host_launch_bound", excess)


TP_OVERLAP_SMS = 16
"""SMs Transformer Engine's userbuffers take from the GEMM for its ``pipeline`` and ``bulk`` overlaps
(``initialize_ub``'s default ``num_sm`` with ``set_sm_margin``, pytorch/module/base.py at TE d0067d0d);
its ``ring_exchange`` overlaps copy with the copy engines (``use_ce``) and take none."""
FP8_GATHER_BYTES = {"fp8": 1 + 4 / 128, "mxfp8": 1 + 1 / 32}
"""Bytes per element a sequence-parallel all-gather moves under FP8 training: Transformer Engine quantises
the input (and in backward the output gradient and the re-gathered input) before gathering it
(``module/linear.py`` at TE d0067d0d: ``gather_along_first_dim(..., quantizer=...)``), FP8 data with the
blockwise recipe's FP32 scale per 128 values or MXFP8's E8M0 scale per 32. Reduce-scatters and all-reduces
move the GEMMs' BF16 outputs."""
TP_OVERLAP_RS_SPLITS = 4
"""Chunks of the ``pipeline`` reduce-scatter overlap (``num_splits`` default): the last chunk's
reduce-scatter follows the GEMM."""


def _tp_blocks(ctx: LayerContext, lf: LayerFlops, moe: bool) -> list[tuple[float, float]]:
    """(column-parallel, row-parallel) forward GEMM seconds of each TP block of the layer on one rank:
    attention (QKV or MLA's projections, then the output projection) and the dense FFN or the shared
    experts (fc1, then fc2). Routed experts are not TP blocks: the dispatcher moves their tokens."""
    model, gpu, prec = ctx.model, ctx.cluster.gpu, ctx.training.precision
    v_dim = model.mla.v_head_dim if model.attention == "mla" and model.mla else model.head_dim
    out_proj = 2.0 * model.num_attention_heads * v_dim * model.hidden_size
    attention_gemms = _gemm_kernels(model, moe=False) - 2
    blocks = [(lf.attn_proj - out_proj, attention_gemms - 1, out_proj)]
    ffn, width = (lf.shared_experts, model.shared_expert_ffn_hidden_size) if moe else (
        lf.dense_ffn, model.ffn_hidden_size)  # fmt: skip
    if ffn:
        fc2 = 2.0 * width * model.hidden_size
        blocks.append((ffn - fc2, 1, fc2))
    return [
        (
            compute.gemm_time(column * ctx.tokens, kernels, gpu, prec),
            compute.gemm_time(row * ctx.tokens, 1, gpu, prec),
        )
        for column, kernels, row in blocks
    ]


def _tp_comm(ctx: LayerContext, lf: LayerFlops, moe: bool, terms: Terms) -> None:
    """TP collectives of one layer, forward and backward, per micro-batch (module docstring).

    Without sequence parallelism each TP block all-reduces its output forward and its input gradient
    backward (BF16). With it (the all-gathers in FP8 under FP8 training, ``FP8_GATHER_BYTES``), forward
    all-gathers the block's input and reduce-scatters its output; backward
    all-gathers the output gradient, reduce-scatters the input gradient and all-gathers the input again
    for the weight gradient of the column-parallel linear (Korthikanti et al. 2022 §4.2.2 keeps only the
    sequence shard), which runs asynchronously beside that linear's data-gradient GEMM. Exposed without
    ``tp_comm_overlap``: all but that re-gather, whose time beyond the GEMM shows. With it (Transformer
    Engine's defaults), per block of column GEMM ``c`` and row GEMM ``r`` on a TP group of t ranks:
    - forward all-gather, ``ring_exchange`` into the column GEMM's chunks: ``max(0, AG - c (t-1)/t)``;
    - forward reduce-scatter, ``pipeline`` of ``TP_OVERLAP_RS_SPLITS`` chunks s behind the row GEMM:
      ``RS/s + max(0, (RS - r)(s-1)/s)``;
    - backward all-gather of the output gradient, ``ring_exchange`` into the row data gradient:
      ``max(0, AG - r (t-1)/t)``;
    - backward re-gather and reduce-scatter, ``bulk`` beside the column data and weight gradients:
      ``max(0, AG - c)`` and ``max(0, RS - c)``;
    and the GEMMs beside ``pipeline`` and ``bulk`` lose ``TP_OVERLAP_SMS`` of the GPU's SMs
    (``tp_overlap_sm_cost``: ``(r + 2c) x sms / (SMs - sms)``).
    """
    p = ctx.parallel
    if p.tp == 1:
        return
    geo = group_geometry(p, MeshAxis.TP, ctx.cluster.num_gpus_per_node)
    link = "inter_node" if geo.crosses_nodes else "intra_node"
    full = ctx.gathered * ctx.model.hidden_size * 2
    gather_bytes = full / 2 * FP8_GATHER_BYTES.get(ctx.training.precision, 2.0)
    blocks = _tp_blocks(ctx, lf, moe)
    forward_total = forward_exposed = total = exposed = sm_cost = 0.0
    if not p.sequence_parallel:
        all_reduce = comm.ring_time(ctx.cluster, "all_reduce", full, geo)
        forward_total = forward_exposed = len(blocks) * all_reduce
        total = exposed = 2 * forward_total
        moved = 2 * len(blocks) * 2 * full * (p.tp - 1) / p.tp
        forward_moved = moved / 2
    else:
        ag = comm.ring_time(ctx.cluster, "all_gather", gather_bytes, geo)
        rs = comm.ring_time(ctx.cluster, "reduce_scatter", full, geo)
        t, s = p.tp, TP_OVERLAP_RS_SPLITS
        sms = ctx.cluster.gpu.num_sms or 132
        for column, row in blocks:
            forward_total += ag + rs
            total += 3 * ag + 2 * rs  # forward AG, RS; backward AG, RS and the re-gather
            if p.tp_comm_overlap:
                fwd = max(0.0, ag - column * (t - 1) / t) + rs / s + max(0.0, (rs - row) * (s - 1) / s)
                bwd = max(0.0, ag - row * (t - 1) / t) + max(0.0, ag - column) + max(0.0, rs - column)
                sm_cost += (row + 2 * column) * TP_OVERLAP_SMS / (sms - TP_OVERLAP_SMS)
            else:
                fwd = ag + rs
                bwd = ag + rs + max(0.0, ag - column)
            forward_exposed += fwd
            exposed += fwd + bwd
        moved = len(blocks) * (3 * gather_bytes + 2 * full) * (p.tp - 1) / p.tp
        forward_moved = len(blocks) * (gather_bytes + full) * (p.tp - 1) / p.tp
    terms.add("tp_comm", total, exposed, link=link)
    terms.add_bytes(link, moved)
    if sm_cost:
        terms.add("tp_overlap_sm_cost", sm_cost)
    if p.recompute == "full":
        # Full recompute re-runs each layer's forward in backward, its TP collectives with it.
        terms.add("tp_comm_recompute", forward_total, forward_exposed, link=link)
        terms.add_bytes(link, forward_moved)


def _cp_comm(ctx: LayerContext, attention: float, terms: Terms) -> None:
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


def layer_terms(ctx: LayerContext, moe: bool, paired: bool = True) -> Terms:
    """Terms of one layer for one micro-batch; under EP overlap, of a pass paired with another micro-batch's,
    or (``paired`` False) of a forward and a backward each run alone (``expert_comm``)."""
    terms = Terms()
    _layer(ctx, layer_flops(ctx.model, ctx.training.seq_len, moe=moe), moe, terms, paired)
    return terms


def head_terms(ctx: LayerContext) -> Terms:
    """Output layer, loss and MTP modules, on the last pipeline rank, per micro-batch."""
    model, gpu, prec = ctx.model, ctx.cluster.gpu, ctx.training.precision
    head = (output_layer_flops(model) + mtp_flops(model, ctx.training.seq_len)) * ctx.tokens
    kernels = 1 + model.mtp_num_layers * 8
    t = compute.gemm_time(head, kernels, gpu, prec) + compute.gemm_time(2 * head, 2 * kernels, gpu, prec)
    t += compute.memory_time(3 * ctx.gathered / ctx.parallel.tp * model.vocab_size * 6, gpu)  # softmax + loss
    terms = Terms()
    terms.add("output_layer_and_mtp", t)
    return terms


def p2p_terms(ctx: LayerContext) -> Terms:
    """Pipeline sends of one rank per micro-batch (forward activations, backward gradients, per chunk)."""
    p = ctx.parallel
    terms = Terms()
    if p.pp > 1:
        geo = group_geometry(p, MeshAxis.PP, ctx.cluster.num_gpus_per_node)
        size = ctx.tokens * ctx.model.hidden_size * 2
        t = 2 * p.vpp * comm.p2p_time(ctx.cluster, size, geo.crosses_nodes)
        link = "inter_node" if geo.crosses_nodes else "intra_node"
        terms.add("pp_p2p", t, 0.0 if p.vpp > 1 else t, link=link)
        terms.add_bytes(link, 2 * p.vpp * size)
    return terms
