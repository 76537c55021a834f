"""``estimate(model, training, parallel, cluster) -> Estimate``: step time, memory and traffic of one plan.

Composition (each term on ``Estimate.breakdown``, with its total and its exposed time):

1. Per micro-batch, per pipeline rank, per layer: GEMMs, fused attention and element-wise kernels
   (``compute.py``) and FP8 quantisation of GEMM operands; recompute adds its forward work; TP
   all-gather/reduce-scatter (with SP) or all-reduce, CP key/value exchange, EP dispatch/combine and
   ETP all-gather (``comm.py``, ``traffic.py``) on the groups placed by ``layout.py``. A layer whose
   kernels the host launches slower than the GPU runs them is host-bound: ``host_launch_bound`` adds
   the difference.
2. Overlap: TP collectives are exposed, or under ``tp_comm_overlap`` overlapped with their GEMMs
   (Transformer Engine's userbuffers, ``layer_terms._tp_comm``). EP communication is exposed unless
   ``a2a_overlap`` (Megatron's ``--overlap-moe-expert-parallel-comm``, or DualPipe) pairs each layer's
   forward with another micro-batch's backward: exposed is what that schedule's phases leave the compute
   stream waiting (``ep_overlap``), and on the pipeline's unpaired warm-up and cool-down passes what each
   leaves run alone (``ep_overlap.unpaired_fraction``); the overlapped compute slows by the share of SMs the
   communication kernels hold (seeds §6.4). CP exchange hides behind
   attention. PP sends are exposed with 1F1B and hidden with interleaving (Megatron overlaps p2p with VPP).
3. Pipeline: ``T = m * t_rank + (pp-1) * t_chunk`` with m micro-batches, t_rank the busiest rank's time
   per micro-batch and t_chunk the largest pipeline chunk's: the pipeline fills and drains one chunk at
   a time, so with equal chunks the bubble is Narayanan et al.'s ``(pp-1)/vpp`` micro-batch times
   (1F1B and interleaved 1F1B, 2021 §2.2) and with the solver's uneven chunks the largest one sets it.
4. Data parallel: gradient reduce-scatter (FP32) and parameter all-gather (BF16) over DP x CP for
   dense and EDP for expert parameters (all-reduce without the distributed optimizer), overlapped with
   the backward of the last and the forward of the first micro-batch; FSDP gathers each layer's weights
   in forward and backward and reduce-scatters its gradients, overlapped with that layer's compute.
5. Optimizer: Adam over the local shard, memory-bound, and with CPU offload the copies to and from the
   host and the host's Adam (``optimizer.py``).
6. Step overhead: a profile's ``step_overhead_s`` (0 unless ``moeplan calibrate`` fitted it to runs),
   host time per step outside every priced kernel and collective.

Routing: ``balanced`` sends the mean load to every expert; ``dropless`` adds the expected excess of
the busiest rank under random routing (``routing_imbalance``); ``capacity`` caps it at the factor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.costmodel import compute
from planner.costmodel.data_parallel import OverlappedTerm, data_parallel_terms, sum_bytes
from planner.costmodel.ep_overlap import unpaired_fraction
from planner.costmodel.flops import model_flops_per_token
from planner.costmodel.layer_terms import head_terms, layer_terms, p2p_terms
from planner.costmodel.memory import (
    MemoryCoefficients,
    memory_coefficients,
    rank_memory,
    ranks_of,
    split_chunks,
)
from planner.costmodel.optimizer import OptimizerRates, host_capacity_per_gpu, optimizer_rates
from planner.costmodel.routing import layout_imbalance
from planner.costmodel.terms import LayerContext, Terms, merge_terms
from planner.schema import (
    ClusterProfile,
    CostTerm,
    Estimate,
    MemoryUse,
    ModelSpec,
    ParallelConfig,
    TrainingSpec,
)
from planner.units import GIB

__all__ = [
    "LayerCache",
    "LayoutCosts",
    "estimate",
    "evaluate",
    "layer_seconds",
    "layout_costs",
]


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

    context: LayerContext
    dense: Terms
    moe: Terms
    head: Terms
    p2p: Terms
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

    optimizer_rates: OptimizerRates = OptimizerRates(0.0, 0.0)
    """Seconds of the optimizer step per byte of its state on the GPU and on the host (``optimizer.py``)."""

    def optimizer_seconds(self, gpu_bytes: float, host_bytes: float = 0.0) -> float:
        """The optimizer step of a rank whose optimizer state takes these bytes on the GPU and the host."""
        return self.optimizer_rates.seconds(gpu_bytes, host_bytes)


@dataclass(slots=True)
class LayerCache:
    """Terms shared by the layouts of one search (one model, training and cluster), each kept under the
    fields of the layout it reads."""

    layers: dict[tuple[object, ...], tuple[Terms, Terms, Terms, float, float, float]] = field(
        default_factory=dict
    )
    """Per-layer terms (dense, MoE, head) and their exposed seconds: shared by layouts that differ only
    in PP, VPP and data parallelism."""
    alone: dict[tuple[object, ...], Terms] = field(default_factory=dict)
    """Under EP overlap, the MoE layer's terms of the passes run without a partner (``layer_terms(paired=
    False)``), under the same keys as ``layers``."""
    p2p: dict[tuple[int, ...], tuple[Terms, float]] = field(default_factory=dict)
    """Pipeline sends: shared by layouts that differ only in what the layers run (recompute, dispatcher)."""
    data_parallel: dict[tuple[object, ...], tuple[OverlappedTerm, ...]] = field(default_factory=dict)
    """Gradient and parameter collectives: they read the degrees and the micro-batch count only."""


def _layer_key(p: ParallelConfig) -> tuple[object, ...]:
    # Everything the per-layer terms depend on: the pipeline and data-parallel degrees do not enter
    # them (their groups' strides are set by tp, cp, etp and ep alone).
    return (p.tp, p.cp, p.ep, p.etp, p.micro_batch, p.sequence_parallel, p.recompute, p.recompute_modules,
            p.dispatcher, p.a2a_overlap, p.grouped_gemm, p.attention_backend, p.cuda_graphs,
            p.tp_comm_overlap, p.moe_router_fusion, p.delay_wgrad_compute)  # fmt: skip


def _p2p_key(p: ParallelConfig) -> tuple[int, ...]:
    # p2p_terms: the pipeline group's placement (strides of tp, cp, dp), vpp, and the tokens per rank.
    return (p.tp, p.cp, p.dp, p.pp, p.vpp, p.micro_batch)


def _data_parallel_key(p: ParallelConfig, num_microbatches: int) -> tuple[object, ...]:
    # data_parallel_terms: the local parameters (tp, pp, ep, etp), the DP x CP and EDP groups' placement,
    # the optimizer's sharding, the overlap, and the micro-batch count.
    return (p.tp, p.cp, p.pp, p.dp, p.ep, p.etp, p.edp, p.fsdp, p.distributed_optimizer,
            p.optimizer.main_grads_dtype, p.fp8_param_gather, p.overlap_grad_reduce, num_microbatches)  # fmt: skip


def _microbatches(training: TrainingSpec, p: ParallelConfig) -> int:
    """Micro-batches each pipeline runs per step (at least 1)."""
    return max(1, training.global_batch // (p.micro_batch * p.dp))


def _context(
    model: ModelSpec, training: TrainingSpec, p: ParallelConfig, cluster: ClusterProfile
) -> LayerContext:
    gathered = p.micro_batch * training.seq_len / p.cp
    tokens = gathered / p.tp
    sustained = compute.sustained_cluster(cluster)
    return LayerContext(model, training, p, sustained, tokens, gathered, layout_imbalance(model, training, p))


def _fill(cache: LayerCache, ctx: LayerContext, key: tuple[object, ...], p2p_key: tuple[int, ...]) -> None:
    """The per-layer and pipeline-send terms of ``ctx``'s layout into ``cache``, where missing."""
    if key not in cache.layers:
        dense = layer_terms(ctx, moe=False)
        moe = layer_terms(ctx, moe=True) if ctx.model.is_moe else Terms()
        head = head_terms(ctx)
        cache.layers[key] = (dense, moe, head, dense.exposed(), moe.exposed(), head.exposed())
        if ctx.model.is_moe and ctx.parallel.a2a_overlap:
            cache.alone[key] = layer_terms(ctx, moe=True, paired=False)
    if p2p_key not in cache.p2p:
        p2p = p2p_terms(ctx)
        cache.p2p[p2p_key] = (p2p, p2p.exposed())


def _with_unpaired(paired: Terms, alone: Terms, fraction: float) -> Terms:
    """One MoE layer's terms per micro-batch when ``fraction`` of its passes run without a partner under EP
    overlap (``ep_overlap.unpaired_fraction``): each term weighted between the paired passes' and the
    unpaired ones' (``layer_terms(paired=False)``: their communication's own exposure, no SMs lent to
    another pass, and the host-launch bound against that)."""
    items = {
        name: [
            (1.0 - fraction) * paired.items.get(name, [0.0, 0.0])[i]
            + fraction * alone.items.get(name, [0.0, 0.0])[i]
            for i in (0, 1)
        ]
        for name in dict.fromkeys([*paired.items, *alone.items])
    }
    return Terms(items, {**alone.links, **paired.links}, dict(paired.bytes))


def _moe_terms(cache: LayerCache, key: tuple[object, ...], p: ParallelConfig, num_microbatches: int) -> Terms:
    """The MoE layer's terms of this layout, its unpaired passes weighed in under EP overlap."""
    moe = cache.layers[key][1]
    if key not in cache.alone:
        return moe
    return _with_unpaired(moe, cache.alone[key], unpaired_fraction(p.pp, p.vpp, num_microbatches))


def layer_seconds(
    model: ModelSpec,
    training: TrainingSpec,
    parallel: ParallelConfig,
    cluster: ClusterProfile,
    cache: LayerCache,
) -> tuple[float, float, float, float]:
    """Exposed seconds per micro-batch of one dense layer, one MoE layer, the output layer and the
    pipeline sends: ``layout_costs``'s ``dense_s``, ``moe_s``, ``head_s`` and ``p2p_s``, without the rest
    of its work where ``cache`` already holds them."""
    key, p2p_key = _layer_key(parallel), _p2p_key(parallel)
    if key not in cache.layers or p2p_key not in cache.p2p:
        _fill(cache, _context(model, training, parallel, cluster), key, p2p_key)
    layers, p2p = cache.layers[key], cache.p2p[p2p_key]
    moe_s = layers[4]
    if key in cache.alone:  # as layout_costs prices it, so that the search's bounds keep their order
        moe_s = _moe_terms(cache, key, parallel, _microbatches(training, parallel)).exposed()
    return layers[3], moe_s, layers[5], p2p[1]


def layout_costs(
    model: ModelSpec,
    training: TrainingSpec,
    parallel: ParallelConfig,
    cluster: ClusterProfile,
    cache: LayerCache | None = None,
    memory: MemoryCoefficients | None = None,
) -> LayoutCosts:
    """Per-layer costs of a layout, independent of how layers are assigned to pipeline stages.

    ``cache`` (one per model, training and cluster) reuses terms across layouts.
    """
    p = parallel
    ctx = _context(model, training, p, cluster)
    num_microbatches = _microbatches(training, p)
    cache = cache if cache is not None else LayerCache()
    key, p2p_key = _layer_key(p), _p2p_key(p)
    _fill(cache, ctx, key, p2p_key)
    dense, moe, head, dense_s, moe_s, head_s = cache.layers[key]
    if key in cache.alone:
        moe = _moe_terms(cache, key, p, num_microbatches)
        moe_s = moe.exposed()
    p2p, p2p_s = cache.p2p[p2p_key]
    dp_key = _data_parallel_key(p, num_microbatches)
    if dp_key not in cache.data_parallel:
        cache.data_parallel[dp_key] = tuple(data_parallel_terms(ctx, num_microbatches))
    return LayoutCosts(
        context=ctx,
        dense=dense,
        moe=moe,
        head=head,
        p2p=p2p,
        num_microbatches=num_microbatches,
        bubble=float(p.pp - 1),
        memory=memory or memory_coefficients(model, training, p, ctx.imbalance),
        dense_s=dense_s,
        moe_s=moe_s,
        head_s=head_s,
        p2p_s=p2p_s,
        data_parallel=cache.data_parallel[dp_key],
        optimizer_rates=optimizer_rates(p.optimizer, training.precision, cluster),
    )


def evaluate(costs: LayoutCosts, chunks: list[tuple[int, int]]) -> Estimate:
    """The estimate of a layout with (dense, moe) layers per pipeline chunk (pp*vpp chunks, in order)."""
    ctx = costs.context
    model, training, p, cluster = ctx.model, ctx.training, ctx.parallel, ctx.cluster
    ranks = ranks_of(chunks, p.pp)
    seconds = [costs.rank_seconds(r, d, m) for r, (d, m) in enumerate(ranks)]
    busiest_rank = max(range(len(ranks)), key=lambda r: seconds[r])
    t_rank = seconds[busiest_rank]
    busiest = Terms()
    dense, moe = ranks[busiest_rank]
    merge_terms(busiest, costs.dense, dense)
    merge_terms(busiest, costs.moe, moe)
    merge_terms(busiest, costs.p2p, 1)
    if busiest_rank == p.pp - 1:
        merge_terms(busiest, costs.head, 1)
    mb = costs.num_microbatches
    bubble = costs.bubble * max(costs.chunk_seconds(c, d, m) for c, (d, m) in enumerate(chunks))
    breakdown = [
        CostTerm(name=name, total_s=total * mb, exposed_s=exposed * mb, link_class=busiest.links.get(name))
        for name, (total, exposed) in sorted(busiest.items.items())
    ]
    breakdown.append(CostTerm(name="pipeline_bubble", total_s=bubble, exposed_s=bubble))
    breakdown.extend(term.cost(t_rank) for term in costs.data_parallel)
    memories = [rank_memory(costs.memory, r, d, m, by_module=False) for r, (d, m) in enumerate(ranks)]
    optimizer = max(costs.optimizer_seconds(memory.optimizer, memory.host_optimizer) for memory in memories)
    breakdown.append(CostTerm(name="optimizer_step", total_s=optimizer, exposed_s=optimizer))
    if cluster.step_overhead_s:  # a calibrated profile's fixed host time per step
        breakdown.append(
            CostTerm(name="step_overhead", total_s=cluster.step_overhead_s, exposed_s=cluster.step_overhead_s)
        )
    top = max(range(len(memories)), key=lambda r: memories[r].total)
    held = rank_memory(costs.memory, top, *ranks[top])  # the rank shown, with its activations by module
    peak = held.total
    memory = MemoryUse(
        pipeline_rank=top,
        weights=held.weights,
        gradients=held.gradients,
        optimizer=held.optimizer,
        activations=held.activations,
        in_flight_microbatches=costs.memory.in_flight[top],
        logits=held.logits,
        dispatch_buffers=held.dispatch_buffers,
        reserve=held.reserve,
        cuda_graph_buffers=held.graph_buffers,
        tp_overlap_buffers=held.tp_overlap_buffers,
        host_optimizer=held.host_optimizer,
        activations_by_module=dict(held.activations_by_module),
    )

    world = p.tp * p.cp * p.pp * p.dp
    step = sum(term.exposed_s for term in breakdown)
    tokens_per_step = training.global_batch * training.seq_len
    model_flops = model_flops_per_token(model, training.seq_len) * tokens_per_step
    tflops = model_flops / (step * world) / 1e12 if step > 0 else 0.0
    peaks = cluster.gpu.peak_tflops
    peak_tflops = peaks.bf16 or peaks.fp16 or 1.0
    fp8_peak = peaks.fp8 if training.precision in ("fp8", "mxfp8") else None
    return Estimate(
        step_time_s=step,
        tokens_per_s_per_gpu=tokens_per_step / (step * world) if step > 0 else 0.0,
        model_tflops_per_gpu=tflops,
        mfu=tflops / peak_tflops,
        mfu_peak="bf16" if peaks.bf16 else "fp16",
        mfu_fp8=tflops / fp8_peak if fp8_peak else None,
        peak_memory_bytes=peak,
        fits=peak <= cluster.gpu.hbm_gib * GIB
        and max(m.host_optimizer for m in memories) <= host_capacity_per_gpu(cluster),
        memory=memory,
        breakdown=tuple(breakdown),
        bytes_per_link_class={link: amount * mb for link, amount in sorted(busiest.bytes.items())},
        gradient_bytes_per_link_class=dict(
            sorted(sum_bytes(*(dict(term.bytes_per_link_class) for term in costs.data_parallel)).items())
        ),
    )


def estimate(
    model: ModelSpec, training: TrainingSpec, parallel: ParallelConfig, cluster: ClusterProfile
) -> Estimate:
    """Predicted step time, throughput, memory and traffic. Never raises for an infeasible plan:
    feasibility is ``planner.feasibility``'s job; memory that does not fit is ``fits=False``."""
    return evaluate(layout_costs(model, training, parallel, cluster), split_chunks(model, parallel))
