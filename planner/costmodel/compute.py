"""Time of the work a GPU does itself: GEMMs, fused attention, element-wise (memory-bound) kernels.

- GEMM of F FLOPs: ``t0 + F / (fraction * peak)`` with the GPU's ``gemm_overhead_us`` and
  ``gemm_fraction_bf16`` (or ``_fp8`` for FP8/MXFP8 training), fitted to measured cuBLAS shapes
  (``benchmarks/fit_gemm_efficiency.py``). Backward runs two GEMMs (data and weight gradients) per
  forward GEMM, each of the forward's FLOPs. A GPU whose measured fraction keeps growing with size
  (the A100: 0.73 at 4096^3, 0.81 at 8192^3, 0.82 at 16384^3 in Azure's cuBLASLt table) carries the
  measured points (``gemm_curve_bf16``): a 16-bit GEMM's fraction is interpolated in log FLOPs at the
  FLOPs of one of its kernels (the layer's GEMM FLOPs over its GEMM kernels: their mean), without t0,
  which the measured times include. A flat fraction cannot price both: the Korthikanti et al. 2022 runs'
  22B layers (about 2e11 FLOPs a GEMM) and 1T layers (about 1e12) differ by 8% in fraction.
- Fused causal attention: forward ``F / (attention_fwd_fraction * bf16 peak)``; backward performs
  2.5x the forward FLOPs (FlashAttention-2 §3.2: it recomputes the scores) at ``attention_bwd_fraction``.
  Attention stays BF16 in FP8 training (Transformer Engine's default).
- Element-wise work (norms, residual adds, RoPE, SwiGLU, router softmax, token permutation):
  bytes moved / (``hbm_fraction`` x HBM bandwidth); the backward moves twice the forward's bytes.
  Per token, in elements of the activation dtype (read + write), counted from Megatron-Core's layer:
  two RMSNorms ``4H``, two residual adds ``6H``, RoPE on queries and keys ``2(q + k)``, gated
  activation ``3F`` (``2F`` without gating); in an MoE layer the router ``3E``, permutation and
  un-permutation ``4kH``, expert activations ``3kF_e`` and shared ``3F_s``.
- FP8 quantisation (FP8/MXFP8 training): Transformer Engine casts every GEMM input to FP8 in forward
  and every output gradient in backward, writing a row-wise and a column-wise (transposed) copy for the
  two backward GEMMs: ``FP8_QUANTIZE_BYTES`` per element over the GEMM widths of ``gemm_widths``
  (TE's fused cast-transpose; weights are cast once per step and cached across micro-batches,
  not counted).
GPUs without measured fractions use the H100 figures (``DEFAULT_EFFICIENCY``), stated in the estimate.

Framework overheads (``FrameworkOverheads``, the profile's ``framework``): training sustains
``sustained_compute_fraction`` of the microbenchmarked GEMM and attention throughput
(``sustained_cluster``), and the host pays ``kernel_host_us`` per kernel a layer launches from Python on
top of the bare launch (``host_us_per_kernel``). Megatron-Core's figures (``MEGATRON_CORE_EAGER``) are
fitted by ``benchmarks/fit_framework_overheads.py``: the fraction to published dense runs, the host
time to published MoE runs; the bundled runtime's (``BUNDLED_RUNTIME``) add nothing to the probe's.

Host-bound layers. In eager mode the host spends ``host_overhead_us`` per kernel it launches (Python,
PyTorch's dispatcher, the launch itself); a layer takes ``max(GPU time, kernels x host time)`` per
micro-batch: the host runs ahead of the GPU only within a layer, because the MoE dispatcher waits for
the tokens-per-expert counts (a device-to-host synchronisation) in every MoE layer. Megatron-LM's GB200
DeepSeek-V3 guide names this the largest loss of its baseline ("the CPU kernel launch speed cannot keep
up with the kernel execution speed on GPU"). ``layer_kernels`` counts a Megatron-Core layer's forward
kernels (backward launches about twice as many: two GEMMs per GEMM, a gradient kernel per element-wise
one):
- attention: input norm, QKV (GQA) or the MLA down/norm/up projections and their split and concat,
  RoPE on queries and keys, fused attention with its layout copies (3), output projection, residual;
  with TP an all-gather and a reduce-scatter (SP) or an all-reduce;
- MoE router and dispatch preprocessing: 31 with Megatron's router fusion and the all-to-all
  dispatcher's permutation, 17 with the fused DeepEP/Hybrid-EP preprocessing (the guide: "reducing
  the total number of kernels in the router part from 72 to 31", "further ... to 17");
- routed experts: the grouped GEMM runs one GEMM per local expert for each of the two matrices
  (multi-stream cuBLAS, the guide §1), FP8 adds a quantisation kernel per expert input; the dispatch
  and combine (all-to-all and (un)permutation), shared experts, the dense FFN;
- FP8: one quantisation kernel per GEMM input.
Recompute launches its modules' forward kernels again in backward (``recompute_kernels``).
CUDA graphs (``ParallelConfig.cuda_graphs``): Transformer Engine's per-layer graphs capture regions of the
layer (``layer_regions``: attention, the MoE router, its preprocessing, a dense FFN), each replayed
forward and backward at ``GRAPH_REPLAY_LAUNCHES`` launches in place of its kernels (recompute inside a
region goes with it); a full-iteration graph leaves the host nothing per layer.
Per-expert kernels are launched in a C++ loop and cost a bare launch (``host_overhead_us``) each; the
others cost ``host_us_per_kernel``. Counts are read off Megatron-Core's layer code [inference: not
profiled here]; the guide's figures are the router's.
"""

from __future__ import annotations

import math

from planner.costmodel.framework_fit import megatron_core_eager
from planner.schema import ClusterProfile, ComputeEfficiency, FrameworkOverheads, GpuSpec, ModelSpec
from planner.units import tflops_to_flops

__all__ = [
    "BUNDLED_RUNTIME",
    "DEFAULT_EFFICIENCY",
    "MEGATRON_CORE_EAGER",
    "attention_time",
    "efficiency_of",
    "elementwise_elements",
    "fp8_quantized_elements",
    "framework_of",
    "gemm_curve_fraction",
    "gemm_peak_flops",
    "gemm_time",
    "graphed_host_launches",
    "host_bound_excess",
    "host_us_per_kernel",
    "layer_kernels",
    "layer_regions",
    "memory_time",
    "recompute_kernels",
    "sustained_cluster",
    "with_framework",
]

DEFAULT_EFFICIENCY = ComputeEfficiency(
    gemm_fraction_bf16=0.784,
    gemm_fraction_fp8=0.652,
    gemm_overhead_us=6.4,
    attention_fwd_fraction=0.523,
    attention_bwd_fraction=0.504,
    hbm_fraction=0.866,
    source="H100 SXM microbenchmarks (planner/catalog/data/gpus.yaml H100-SXM), used for a GPU without its own figures",
)

MEGATRON_CORE_EAGER = megatron_core_eager()
"""Megatron-Core in eager mode (no CUDA graphs): the framework a profile without its own figures trains with.

80 us is per kernel the layer launches from Python, counted as ``layer_kernels`` counts; it carries
what those counts miss (Python-only work such as allocations, views and the device-to-host waits), so
it is a per-layer host cost expressed per counted kernel, not the price of one ``cudaLaunchKernel``."""

BUNDLED_RUNTIME = FrameworkOverheads(
    kernel_host_us=0.0,
    sustained_compute_fraction=1.0,
    source=(
        "moeplan's bundled runtime: its per-operation host cost is what the probe measures "
        "(host_overhead_us) and its kernels are the probe's microbenchmarks, so nothing is added"
    ),
)
"""The framework ``moeplan run`` measures: predictions of its runs use this unless the profile says otherwise."""


def framework_of(cluster: ClusterProfile) -> FrameworkOverheads:
    """The profile's framework overheads, or Megatron-Core's."""
    return cluster.framework or MEGATRON_CORE_EAGER


def with_framework(cluster: ClusterProfile, framework: FrameworkOverheads) -> ClusterProfile:
    """The profile with ``framework`` where it names none of its own (its own figures win)."""
    return cluster if cluster.framework is not None else cluster.model_copy(update={"framework": framework})


def host_us_per_kernel(cluster: ClusterProfile) -> float:
    """Host microseconds per launched kernel: the bare launch plus the framework's share."""
    return cluster.host_overhead_us + framework_of(cluster).kernel_host_us


_SUSTAINED: dict[int, tuple[ClusterProfile, ClusterProfile]] = {}
"""Scaled profiles by the id of their source (kept alive beside it, so an id is never reused for
another profile while cached): the solver prices thousands of layouts on one profile."""


def sustained_cluster(cluster: ClusterProfile) -> ClusterProfile:
    """The profile with its GPU's GEMM and attention fractions scaled to what training sustains."""
    cached = _SUSTAINED.get(id(cluster))
    if cached is not None and cached[0] is cluster:
        return cached[1]
    if len(_SUSTAINED) >= 64:
        _SUSTAINED.clear()
    scaled = _scaled(cluster)
    _SUSTAINED[id(cluster)] = (cluster, scaled)
    return scaled


def _scaled(cluster: ClusterProfile) -> ClusterProfile:
    fraction = framework_of(cluster).sustained_compute_fraction
    if fraction == 1.0:
        return cluster
    eff = efficiency_of(cluster.gpu)
    curve = eff.gemm_curve_bf16
    scaled = eff.model_copy(
        update={
            "gemm_fraction_bf16": eff.gemm_fraction_bf16 * fraction,
            "gemm_curve_bf16": None if curve is None else tuple((f, share * fraction) for f, share in curve),
            "gemm_fraction_fp8": None if eff.gemm_fraction_fp8 is None else eff.gemm_fraction_fp8 * fraction,
            "attention_fwd_fraction": eff.attention_fwd_fraction * fraction,
            "attention_bwd_fraction": eff.attention_bwd_fraction * fraction,
        }
    )
    return cluster.model_copy(update={"gpu": cluster.gpu.model_copy(update={"efficiency": scaled})})


ATTENTION_BWD_FLOPS_RATIO = 2.5
"""Backward FLOPs of fused attention over forward (FlashAttention-2, arXiv 2307.08691 §3.2)."""


def efficiency_of(gpu: GpuSpec) -> ComputeEfficiency:
    """The GPU's measured fractions, or the H100 defaults."""
    return gpu.efficiency or DEFAULT_EFFICIENCY


def _half_peak(gpu: GpuSpec, precision: str = "bf16") -> float:
    """The 16-bit tensor-core peak: the training precision's where the datasheet gives it."""
    peaks = gpu.peak_tflops
    peak = (peaks.fp16 or peaks.bf16) if precision == "fp16" else (peaks.bf16 or peaks.fp16)
    assert peak is not None  # PeakTflops guarantees one of them
    return tflops_to_flops(peak)


def gemm_peak_flops(gpu: GpuSpec, precision: str) -> float:
    """Sustained GEMM FLOP/s for the training precision (FP8 peak for fp8/mxfp8 where the GPU has it)."""
    eff = efficiency_of(gpu)
    if precision in ("fp8", "mxfp8") and gpu.peak_tflops.fp8 is not None:
        fraction = eff.gemm_fraction_fp8 or eff.gemm_fraction_bf16
        return tflops_to_flops(gpu.peak_tflops.fp8) * fraction
    return _half_peak(gpu, precision) * eff.gemm_fraction_bf16


def gemm_curve_fraction(curve: tuple[tuple[float, float], ...], flops: float) -> float:
    """The fraction of the peak at a GEMM of ``flops``: linear in log FLOPs between the measured points,
    the end points' fractions beyond them."""
    if flops <= curve[0][0]:
        return curve[0][1]
    for (lo, low), (hi, high) in zip(curve, curve[1:], strict=False):
        if flops <= hi:
            return low + (high - low) * math.log(flops / lo) / math.log(hi / lo)
    return curve[-1][1]


def gemm_time(flops: float, num_kernels: float, gpu: GpuSpec, precision: str) -> float:
    """Seconds for ``num_kernels`` GEMMs that together perform ``flops``."""
    eff = efficiency_of(gpu)
    fp8 = precision in ("fp8", "mxfp8") and gpu.peak_tflops.fp8 is not None
    if eff.gemm_curve_bf16 is not None and not fp8 and num_kernels > 0:
        fraction = gemm_curve_fraction(eff.gemm_curve_bf16, flops / num_kernels)
        return flops / (_half_peak(gpu, precision) * fraction)
    return num_kernels * eff.gemm_overhead_us * 1e-6 + flops / gemm_peak_flops(gpu, precision)


def attention_time(forward_flops: float, gpu: GpuSpec) -> tuple[float, float]:
    """(forward, backward) seconds of fused causal attention with the given forward FLOPs."""
    eff = efficiency_of(gpu)
    peak = _half_peak(gpu)
    forward = forward_flops / (peak * eff.attention_fwd_fraction)
    backward = ATTENTION_BWD_FLOPS_RATIO * forward_flops / (peak * eff.attention_bwd_fraction)
    return forward, backward


def memory_time(num_bytes: float, gpu: GpuSpec) -> float:
    """Seconds to move ``num_bytes`` through HBM at the achieved bandwidth."""
    return num_bytes / (gpu.hbm_gbps * 1e9 * efficiency_of(gpu).hbm_fraction)


def elementwise_elements(model: ModelSpec, moe: bool) -> dict[str, float]:
    """Forward element-wise traffic per token of one layer, in elements, by the module that moves it.

    Keys follow Megatron's recompute module names where one applies (``layernorm``, ``moe_act``).
    """
    h = model.hidden_size
    glu = 3 if model.gated_linear_unit else 2
    if model.attention == "mla" and model.mla is not None:
        q = model.num_attention_heads * (model.mla.qk_head_dim + model.mla.qk_pos_emb_head_dim)
        k = q
    else:
        q = model.num_attention_heads * model.head_dim
        k = model.query_groups * model.head_dim
    parts = {"layernorm": 4.0 * h, "residual": 6.0 * h, "rope": 2.0 * (q + k)}
    if moe and model.num_experts is not None and model.moe_router_topk is not None:
        k_top = model.moe_router_topk
        parts["router"] = 3.0 * model.num_experts
        parts["permute"] = 4.0 * k_top * h
        parts["moe_act"] = (
            glu * k_top * model.expert_ffn_hidden_size + glu * model.shared_expert_ffn_hidden_size
        )
    else:
        parts["mlp_act"] = glu * model.ffn_hidden_size
    return parts


FP8_QUANTIZE_BYTES = 4.0
"""Bytes per quantised element: read BF16 (2), write FP8 row-wise and column-wise copies (1 + 1)
(Transformer Engine's cast-transpose, which feeds Hopper's TN-only FP8 GEMMs, NVIDIA TE docs
"Using FP8 with Transformer Engine")."""


def gemm_widths(model: ModelSpec, moe: bool) -> list[tuple[float, float]]:
    """(input width, output width) per token of every GEMM of one layer, copies per token folded in.

    The router GEMM is left out: it stays in BF16/FP32 under FP8 training.
    """
    h, a = model.hidden_size, model.num_attention_heads
    widths: list[tuple[float, float]] = []
    if model.attention == "mla" and model.mla is not None:
        mla = model.mla
        qk = a * (mla.qk_head_dim + mla.qk_pos_emb_head_dim)
        if mla.q_lora_rank is not None:
            widths += [(h, mla.q_lora_rank), (mla.q_lora_rank, qk)]
        else:
            widths.append((h, qk))
        widths += [
            (h, mla.kv_lora_rank + mla.qk_pos_emb_head_dim),
            (mla.kv_lora_rank, a * (mla.qk_head_dim + mla.v_head_dim)),
            (a * mla.v_head_dim, h),
        ]
    else:
        d, g = model.head_dim, model.query_groups
        widths += [(h, (a + 2 * g) * d), (a * d, h)]
    up = 2 if model.gated_linear_unit else 1  # fc1 writes the gate and the up projection
    if moe and model.num_experts is not None and model.moe_router_topk is not None:
        k, fe, fs = model.moe_router_topk, model.expert_ffn_hidden_size, model.shared_expert_ffn_hidden_size
        widths += [(k * h, k * up * fe), (k * fe, k * h)]
        if fs:
            widths += [(h, up * fs), (fs, h)]
    else:
        f = model.ffn_hidden_size
        widths += [(h, up * f), (f, h)]
    return widths


def fp8_quantized_elements(model: ModelSpec, moe: bool) -> float:
    """Elements per token of one layer that FP8 training quantises: GEMM inputs (forward) and
    output gradients (backward)."""
    return float(sum(inp + out for inp, out in gemm_widths(model, moe)))


HOST_PASSES = 3
"""Kernels of forward plus backward over the forward's (backward launches about twice as many)."""


def layer_kernels(
    model: ModelSpec, moe: bool, router_kernels: int, local_experts: int, tp: int, fp8: bool
) -> tuple[int, int]:
    """Forward kernels one rank launches for one layer and micro-batch (see the module docstring):
    (kernels each launched from Python, kernels launched in a C++ loop).

    ``router_kernels``: the dispatcher's router and dispatch preprocessing kernels (its ``router_kernels``).
    The routed experts' per-expert GEMMs (and FP8 quantisations) are issued by Transformer Engine's
    grouped GEMM in one C++ call, so they cost the host a bare launch each, not the framework's share.
    """
    regions, looped = layer_regions(model, moe, router_kernels, local_experts, tp, fp8)
    return sum(regions.values()), looped


def layer_regions(
    model: ModelSpec, moe: bool, router_kernels: int, local_experts: int, tp: int, fp8: bool
) -> tuple[dict[str, int], int]:
    """``layer_kernels``' Python-launched kernels by the region a CUDA graph scope captures (``attn``,
    ``moe_router``, ``moe_preprocess``, ``mlp``; ``other``: what no per-layer scope captures), and the
    C++-looped ones. ``attn`` is ``TransformerLayer._forward_attention``: the input norm to the residual
    add, its TP collectives and FP8 casts; ``moe_router`` the pre-MLP norm and the router part (the guide's
    31 or 17 kernels); ``moe_preprocess`` the dispatcher's token counts; ``mlp`` a dense layer's FFN."""
    if model.attention == "mla" and model.mla is not None:
        projections = 4 if model.mla.q_lora_rank is not None else 3
        attention = (
            1 + projections + 2 + 4 + 2 + 3 + 1 + 1
        )  # norms, GEMMs, split/concat, RoPE, attn, out, add
        attention_gemms = projections + 1
    else:
        attention = 1 + 1 + 2 + 3 + 1 + 1
        attention_gemms = 2
    tp_comm = 0 if tp == 1 else 2  # per block: an all-gather and a reduce-scatter (SP) or an all-reduce
    regions = {"attn": attention + tp_comm + (attention_gemms if fp8 else 0)}
    looped = 0
    if moe and model.num_experts is not None:
        shared = 4 if model.shared_expert_ffn_hidden_size else 0
        dispatch = 3  # token counts and tokens exchanged, then the local permutation
        # norm and router, token counts | the rest of the dispatch, the experts' activation, combine,
        # shared experts, residual
        regions["moe_router"] = 1 + router_kernels
        regions["moe_preprocess"] = 1
        regions["other"] = (dispatch - 1) + 1 + dispatch + shared + 1 + tp_comm + (2 if fp8 and shared else 0)
        looped = 2 * local_experts * (2 if fp8 else 1)
    else:
        regions["mlp"] = (
            1 + 1 + 1 + 1 + 1 + tp_comm + (2 if fp8 else 0)
        )  # norm, fc1, activation, fc2, residual
    return regions, looped


GRAPH_REPLAY_LAUNCHES = 2
"""Host launches one replay of a Transformer Engine graphed callable costs, counted at the framework's
per-kernel host time: the copy of its inputs into the graph's static buffers, then ``CUDAGraph.replay``
(``make_graphed_callables``' ``Graphed.forward`` and ``backward``, TransformerEngine d0067d0d). A graphed
region replays twice a micro-batch, forward and backward, where it launched ``HOST_PASSES`` times its
forward kernels."""


def graphed_host_launches(regions: dict[str, int], scopes: tuple[str, ...]) -> tuple[int, int]:
    """(forward kernels of ``regions`` that per-layer CUDA graphs of ``scopes`` capture, host launches their
    replays cost a micro-batch). Megatron-Core captures ``moe_preprocess`` only with ``moe_router``, one
    graph for both (a rule, ``planner.feasibility``); ``full_iteration`` is not per-layer (the caller)."""
    captured = [scope for scope in ("attn", "moe_router", "moe_preprocess", "mlp") if scope in scopes]
    graphs = sum(1 for scope in captured if scope in regions and scope != "moe_preprocess")
    return sum(regions.get(scope, 0) for scope in captured), 2 * GRAPH_REPLAY_LAUNCHES * graphs


def recompute_kernels(model: ModelSpec, moe: bool, modules: tuple[str, ...], full: bool, layer: int) -> int:
    """Forward kernels the backward launches again to recompute ``modules`` (``full``: the whole layer
    of ``layer`` forward kernels), counted as ``layer_kernels`` counts them."""
    if full:
        return layer
    mla = model.attention == "mla" and model.mla is not None
    per_module = {
        "core_attn": 3,  # fused attention and its layout copies
        "layernorm": 2,  # the two norms
        "mla_up_proj": 2 + 4 + 2 if mla else 0,  # up projections, split/concat, RoPE
        "mlp": 0 if moe else 3,  # fc1, activation, fc2 of a dense layer
        "moe_act": 1 if moe else 0,
        "shared_experts": 3 if moe and model.shared_expert_ffn_hidden_size else 0,
        "moe": layer if moe else 0,  # most of an MoE layer: bounded by the layer
    }
    return min(layer, sum(per_module.get(name, 0) for name in modules))


def host_bound_excess(gpu_seconds: float, host_seconds: float) -> float:
    """Seconds a layer adds beyond its GPU time when its launches take longer than its kernels run."""
    return max(0.0, host_seconds - gpu_seconds)
