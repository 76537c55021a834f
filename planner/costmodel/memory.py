"""Peak device memory per GPU, the way Megatron-Core allocates it.

Model state, bytes per parameter (each choice is a field of ``OptimizerConfig``; Megatron-LM d98e8a6):

- weights 2 (BF16; Megatron-LM's FP8 keeps BF16 parameters unless ``--fp8-param-gather``, and then
  Transformer Engine caches an FP8 copy of each GEMM weight, 2 more: ``FP8_WEIGHT_CACHE_BYTES``);
- main gradients 4 under Megatron-LM's default for ``--bf16`` (``--accumulate-allreduce-grads-in-fp32``,
  arguments.py), 2 with ``--grad-reduce-in-bf16`` (Megatron-Core's and Megatron-Bridge's default,
  ``DistributedDataParallelConfig.grad_reduce_in_fp32 = False``);
- optimizer 12: an FP32 master copy and Adam's m and v. With ``--use-precision-aware-optimizer``
  Transformer Engine's FusedAdam keeps the master: under BF16 as the 16-bit remainder of the FP32 value
  (``store_param_remainders``, optimizer_config.py), 2 bytes; otherwise 4 (under FP8 current or MX
  scaling Megatron-Core keeps an FP32 master, optimizer_config.py ``use_precision_aware_optimizer_no_fp8_or_ds_fp8``);
  the moments 4 each in FP32, 2 in BF16 (``--exp-avg-dtype``/``--exp-avg-sq-dtype``). A full FP32 master
  also where Megatron-Core does not hand the master to FusedAdam under BF16 (``param_remainders`` false:
  Megatron-Bridge's recipes, whose mixed-precision config names an FP8 recipe even without FP8);
- CPU offload (``--optimizer-offload-fraction f``; ``cpu_offloading/hybrid_optimizer.py``): the host
  holds, for a share f of the parameters, an FP32 copy, a pinned FP32 copy of the gradient and the FP32 m
  and v of ``torch.optim.AdamW``, 16 bytes and the pinned allocator's rounding (``HOST_STATE_BYTES``);
  the GPU keeps, for the rest, an FP32 copy (``param_update_in_fp32``) and FP32 m and v, 12 bytes.

The optimizer state is sharded over the data-parallel group with ``--use-distributed-optimizer``
(``6 + 12/d`` by default). Dense parameters are split over TP (but the norms, the router and MLA's
down-projections, which every TP rank holds whole) and PP and sharded over DP x CP; routed
experts over ETP x EP and PP and sharded over EDP (parallel folding). ``fsdp`` is Megatron-FSDP's
``optim_grads_params``: weights, gradients and optimizer state sharded over the same groups, the master its
own FP32 main-weight shard (``--megatron-fsdp-main-params-dtype`` fp32; it turns FusedAdam's master off,
optimizer/__init__.py:1148-1161, so no remainders), the embedding and output layer's weights whole (not FSDP
units), plus the unsharded weights gathered and prefetched and two units' gradients (``_fsdp_workspace``).
``dp_sharding: fsdp2`` is PyTorch FSDP2 as torchtitan runs it (``FSDP2_SHARD_BYTES``): FP32 parameter and
gradient shards and Adam's FP32 m and v, 16 bytes over N, no separate master; the BF16 compute weights whole
on top where torchtitan keeps them gathered from forward to backward (``distributed_optimizer``, emitted as
``fsdp_reshard_after_forward = "never"``), two layers of them where it reshards (``fsdp``); every layer,
the embedding and the output layer are FSDP units (torchtitan ``apply_fsdp``); ``_fsdp2_workspace``.
Megatron-LM's own ``--use-torch-fsdp2`` (no expert or pipeline parallelism, arguments.py) is not priced.

Activations per token of one layer (Korthikanti et al. 2022, arXiv 2205.05198, adapted to GQA, MLA and
MoE; flash attention stores no score matrix), all divided by TP under sequence parallelism (BF16,
GEMM inputs in FP8 under FP8 training; see ``_layer_activation_bytes``): residual inputs ``2H``; norm
outputs ``2H`` (dropped by ``layernorm`` recompute);
Q, K, V and the attention output (``mla_up_proj`` recompute keeps MLA's latents instead of the
up-projected heads); dense FFN ``3F`` gated (dropped by ``mlp``); MoE: router probabilities, k permuted
inputs ``kH`` (not the k expert outputs: Megatron-Core applies the probabilities inside the expert
activation and un-permutes without them, so nothing keeps the outputs; ``moe/experts.py``,
``moe/token_dispatcher.py`` at Megatron-LM d98e8a6), expert FFN ``2kF_e + kF_e`` (``moe_act`` drops
``kF_e``), shared experts ``3F_s``, all dropped by ``moe``. ``full`` recompute keeps only each layer's input. In flight: the
first pipeline stage holds ``min(m, pp)`` micro-batches under 1F1B, times ``1 + (pp-1)/(pp*vpp)`` when
interleaved (Korthikanti §4.2.3). Logits: BF16 logits and an FP32 softmax of the current micro-batch.
Dispatch buffers: DeepEP/Hybrid-EP reserve 1 GB of NVLink and 1 GB of RDMA buffer per rank (DeepEP's
test defaults ``num_nvl_bytes = num_rdma_bytes = 1e9``); a flat all-to-all needs send and receive
copies of the routed tokens. A fixed reserve covers the CUDA context, NCCL and allocator
fragmentation (an assumption until ``moeplan run`` measures it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from planner.costmodel.dispatchers import dispatcher
from planner.costmodel.params import attention_params, ffn_params, tp_replicated_attention_params
from planner.schema import ModelSpec, OptimizerConfig, ParallelConfig, TrainingSpec

__all__ = [
    "CUDA_GRAPH_BUFFER_BYTES",
    "CUDA_GRAPH_PIPELINED_BUFFER_BYTES",
    "RESERVE_BYTES",
    "HOST_STATE_BYTES",
    "activation_parts",
    "cuda_graph_buffer_bytes",
    "tp_overlap_buffer_bytes",
    "FP32_STATE_BYTES",
    "MemoryBreakdown",
    "MemoryCoefficients",
    "MemoryModel",
    "estimate_memory",
    "memory_coefficients",
    "optimizer_bytes_per_param",
    "rank_memory",
    "ranks_of",
    "split_chunks",
    "split_layers",
    "unfused_score_bytes",
    "with_optimizer",
]

RESERVE_BYTES = 3 * 2**30
"""What a GPU holds beyond PyTorch's allocated bytes: the CUDA context, NCCL's buffers and the caching
allocator's fragmentation. 3 GiB, a judgement between what the published parts add up to and what runs
that ran allow; no source gives the sum for a training job.

- CUDA context: 0.27 GiB with lazy module loading, 0.62 GiB without (pytorch/pytorch#86509, NVIDIA's
  measurement); lazy loading is CUDA 12.2's default on Linux (CUDA programming guide, "Lazy Loading").
  The kernels a training step loads on top are not published.
- NCCL: about 9 MiB per channel and peer connection (4 MiB Simple, 4.7 MiB LL128, 0.5 MiB LL; nccl
  src/init.cc, device.h, transport/p2p.cc), allocated on first use of an algorithm since NCCL 2.22;
  0.54-0.69 GB per communicator measured on 4 A100 (NVIDIA/nccl#964); an NCCL all-to-all on 8 H100 took
  3.3 GB (NVIDIA/nccl#1685). NVLS takes 0.25 GiB per intra-node communicator on NCCL 2.22 on, 1.5 GiB
  before (transport/nvls.cc); Megatron-LM's MoE guide and Megatron-Bridge's recipes set
  NCCL_NVLS_ENABLE=0 "to prevent memory overhead" (moe/README.md), and so do moeplan's Megatron launchers.
- Fragmentation with expandable segments: Megatron-Bridge's Moonlight recompute study reports 36.6 GB
  allocated and "maximum reserved memory stayed near 40 GB" (skills/nemo-mbridge-perf-activation-recompute),
  about 3.4 GB or 9% of allocated.
- Bound from above by runs that ran: with moeplan's allocated predictions, a reserve above 4.0 GiB would
  call DGXC-L31-8B-BF16 (benchmarks/data/dense-h100.yaml) out of memory, above 7.2 GiB MB-2511-Q30-H100
  (published.yaml).

A measurement on a GPU (``moeplan run`` reading ``max_memory_reserved`` and the device's used memory)
would replace the judgement."""
CUDA_GRAPH_BUFFER_BYTES = 2e9
"""Static buffers of Transformer Engine's per-layer CUDA graphs without a pipeline: the graphs' inputs,
outputs and private memory pool stay allocated for replay. "~0-2 GB extra (TE scoped)" (Megatron-Bridge
docs/training/cuda-graphs.md, "Impacted Training Dimensions", nightly 2026): the upper figure is taken."""
CUDA_GRAPH_PIPELINED_BUFFER_BYTES = 10e9
"""The same with a pipeline (Megatron-Core captures a graph per micro-batch in flight, each with its own
buffers) or a full-iteration graph: "Models with PP > 1 can consume over 10 GB of additional memory";
"10 GB+ possible with PP > 1 or large MoE"; full-iteration graphs have "the largest memory footprint"
(the same page). 10 GB is the page's figure and may be low for a long pipeline."""


def cuda_graph_buffer_bytes(p: ParallelConfig) -> float:
    """GPU bytes the plan's CUDA graphs hold beyond the eager step (``ParallelConfig.cuda_graphs``)."""
    if not p.cuda_graphs:
        return 0.0
    if p.pp > 1 or "full_iteration" in p.cuda_graphs:
        return CUDA_GRAPH_PIPELINED_BUFFER_BYTES
    return CUDA_GRAPH_BUFFER_BYTES


TP_OVERLAP_BUFFERS_PER_ELEMENT = {"bf16": 24.0, "fp8": 16.0}
"""Bytes per element of a micro-batch's gathered activation (``seq_len x micro_batch / cp`` rows of
``hidden``, Megatron's ``_initialize_tp_communicators`` shape) that Transformer Engine's userbuffers hold
under ``tp_comm_overlap``: ``initialize_ub`` registers one buffer of that shape for each of its 12 default
names (4 ``ring_exchange``, 2 ``pipeline``, 4 ``bulk``, 2 ``external``; all-gathers, reduce-scatters of the
``pipeline`` kind in ``CommOverlap`` at 1x, TE pytorch/module/base.py and comm_gemm_overlap.cpp at
d0067d0d), in BF16 (12 x 2), or under FP8 training with the 8 all-gather buffers in FP8 (8 x 1 + 4 x 2)."""


def tp_overlap_buffer_bytes(model: ModelSpec, training: TrainingSpec, p: ParallelConfig) -> float:
    """GPU bytes of Transformer Engine's userbuffers for ``tp_comm_overlap`` (0 without it)."""
    if not p.tp_comm_overlap:
        return 0.0
    buffers = "fp8" if training.precision in ("fp8", "mxfp8") else "bf16"
    rows = training.seq_len * p.micro_batch / p.cp
    return rows * model.hidden_size * TP_OVERLAP_BUFFERS_PER_ELEMENT[buffers]


ACT_BYTES = 2
"""Activations are BF16 (FP8 training keeps BF16 activations between layers)."""
HOST_STATE_BYTES = 20.0
"""Host bytes per offloaded parameter: FP32 parameter, pinned FP32 gradient, m and v, 16
(hybrid_optimizer.py), plus the pinned allocator's rounding of the two pinned buffers up to a power of
two (pytorch#150517): 1.44x on their 8 bytes for sizes spread evenly in log scale, about 4 more."""
FP32_STATE_BYTES = 12.0
"""Optimizer bytes per parameter of an FP32 master copy and FP32 Adam m and v: Megatron-LM's default, and
what the offloading optimizer keeps on the GPU for the share it does not offload."""


@dataclass(frozen=True, slots=True)
class MemoryBreakdown:
    """Bytes per GPU on the busiest pipeline stage."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    dispatch_buffers: float
    reserve: float
    host_optimizer: float = 0.0
    """Host memory of the offloaded optimizer state (not part of ``total``, the GPU's bytes)."""
    graph_buffers: float = 0.0
    """CUDA graphs' static buffers (``cuda_graph_buffer_bytes``)."""
    tp_overlap_buffers: float = 0.0
    """Transformer Engine's userbuffers (``tp_overlap_buffer_bytes``)."""
    activations_by_module: tuple[tuple[str, float], ...] = ()
    """``activations`` by the module that keeps them (``activation_parts``), in the layer's order."""

    @property
    def total(self) -> float:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.logits
            + self.dispatch_buffers
            + self.reserve
            + self.graph_buffers
            + self.tp_overlap_buffers
        )


def _layer_activation_bytes(
    model: ModelSpec, parallel: ParallelConfig, moe: bool, imbalance: float, fp8: bool
) -> tuple[float, float]:
    """Cached on what it depends on: the model, the recompute choice, the layer kind, imbalance, FP8."""
    return _activation_bytes(
        model, parallel.recompute, parallel.effective_recompute_modules, moe, imbalance, fp8
    )


@lru_cache(maxsize=4096)
def _activation_bytes(
    model: ModelSpec, recompute: str, modules_tuple: tuple[str, ...], moe: bool, imbalance: float, fp8: bool
) -> tuple[float, float]:
    """Stored activation bytes per token of one layer: (hidden-sized, head- or FFN-sized), the sums of
    ``activation_parts``."""
    parts = activation_parts(model, recompute, modules_tuple, moe, imbalance, fp8)
    return sum(hidden for _, hidden, _ in parts), sum(sharded for _, _, sharded in parts)


@lru_cache(maxsize=4096)
def activation_parts(
    model: ModelSpec, recompute: str, modules_tuple: tuple[str, ...], moe: bool, imbalance: float, fp8: bool
) -> tuple[tuple[str, float, float], ...]:
    """Stored activation bytes per token of one layer by module: (module, hidden-sized, head- or FFN-sized).

    The hidden-sized part (residuals, norm outputs) is split over TP only under sequence parallelism; the
    other (attention heads, FFN and experts) is always split over TP (or spread over EP x ETP).
    GEMM inputs are kept in the GEMM's precision: with FP8 training Transformer Engine saves the FP8
    copy (1 byte) for the weight gradient; the attention output is saved twice, BF16 by the fused
    attention and FP8 by the projection (Megatron-LM GB200 guide §2.2.2: "it actually saves 1.5 times").
    Modules a recompute choice drops are left out.
    """
    h = model.hidden_size
    gemm_in = 1.0 if fp8 else ACT_BYTES  # bytes per element of a saved GEMM input
    modules = set(modules_tuple)
    if recompute == "full":
        return (("layer inputs (full recompute)", float(h * ACT_BYTES), 0.0),)
    # residual stream (2 x H, BF16) and the two norm outputs, which are GEMM inputs
    parts = [("residual stream", 2.0 * h * ACT_BYTES, 0.0)]
    if "layernorm" not in modules:
        parts.append(("norm outputs", 2.0 * h * gemm_in, 0.0))
    a = model.num_attention_heads
    attention_out = a * (model.mla.v_head_dim if model.attention == "mla" and model.mla else model.head_dim)
    out = attention_out * (ACT_BYTES + (1.0 if fp8 else 0.0))  # SDPA's output, plus the FP8 copy
    if model.attention == "mla" and model.mla is not None:
        mla = model.mla
        latents = mla.kv_lora_rank + mla.qk_pos_emb_head_dim + (mla.q_lora_rank or 0)
        heads = a * (mla.qk_head_dim + mla.qk_pos_emb_head_dim) * 2 + a * mla.v_head_dim
        attention = latents * gemm_in + (0.0 if "mla_up_proj" in modules else heads * ACT_BYTES) + out
    else:
        d = model.head_dim
        attention = (a * d + 2 * model.query_groups * d) * ACT_BYTES + out
    parts.append(("attention", 0.0, attention))
    glu = 3 if model.gated_linear_unit else 2
    if not moe:
        # fc1 output (activation input, BF16) and the activation output (fc2 input)
        if "mlp" not in modules:
            ffn = (glu - 1) * model.ffn_hidden_size * ACT_BYTES + model.ffn_hidden_size * gemm_in
            parts.append(("MLP", 0.0, ffn))
        return tuple(parts)
    if "moe" in modules:
        return tuple(parts)
    k = (model.moe_router_topk or 1) * imbalance
    f_e = model.expert_ffn_hidden_size
    parts.append(("router scores", 0.0, 4.0 * (model.num_experts or 0)))  # FP32
    # permuted expert inputs (fc1 input) and fc1 outputs. Not the expert outputs: Megatron-Core weighs
    # tokens by their router probabilities inside the activation (experts.py, weighted_bias_swiglu_impl
    # or ``* permuted_probs``) and un-permutes without them (token_dispatcher.py), so the backward of
    # un-permutation needs only the index map and nothing saves the k x H outputs.
    expert = k * h * gemm_in + k * (glu - 1) * f_e * ACT_BYTES
    if "moe_act" not in modules:
        expert += k * f_e * gemm_in
    parts.append(("routed experts", 0.0, expert))
    f_s = model.shared_expert_ffn_hidden_size
    # Shared experts: fc1 outputs and activation outputs; their input is the MLP norm's output, already
    # counted above, except for the FP8 copy Transformer Engine saves for their own fc1 under FP8.
    if f_s and "shared_experts" not in modules:
        shared = (glu - 1) * f_s * ACT_BYTES + f_s * gemm_in + (h * gemm_in if fp8 else 0.0)
        parts.append(("shared experts", 0.0, shared))
    return tuple(parts)


@dataclass(frozen=True, slots=True)
class MemoryCoefficients:
    """Bytes per GPU as a linear function of the layers a pipeline rank holds (what the solver uses)."""

    dense_layer_state: tuple[float, float, float]
    """(weights, gradients, optimizer states) bytes of one dense layer on its rank."""
    moe_layer_state: tuple[float, float, float]
    """The same for one MoE layer (its experts spread over EP x ETP)."""
    dense_layer_activations: float
    """Activations one dense layer keeps per micro-batch in flight."""
    moe_layer_activations: float
    """The same for one MoE layer."""
    first_rank_state: tuple[float, float, float]
    """Embedding state on the first rank."""
    last_rank_state: tuple[float, float, float]
    """Output layer (and MTP) state on the last rank."""
    logits: float
    """Logits and softmax of the current micro-batch on the last rank."""
    recompute_workspace: float
    """One layer's full activations while it is recomputed (full recompute)."""
    dispatch_buffers: float
    reserve: float
    in_flight: tuple[float, ...]
    """Micro-batches whose activations each pipeline rank holds at its peak."""
    dense_layer_parts: tuple[tuple[str, float, float], ...] = ()
    """``dense_layer_activations`` by module, per token as ``activation_parts`` gives them: scaled by
    ``part_scale`` only when a rank's breakdown is asked for (``rank_memory``), not for every layout."""
    moe_layer_parts: tuple[tuple[str, float, float], ...] = ()
    """The same for ``moe_layer_activations``."""
    part_scale: tuple[float, float] = (0.0, 1.0)
    """(tokens per rank, copies of a hidden-sized tensor over TP): a part's bytes per layer are
    ``tokens * (hidden * copies + sharded)``."""
    host_per_layer: tuple[float, float] = (0.0, 0.0)
    """Host bytes of the offloaded optimizer state of one (dense, MoE) layer."""
    mtp_activations: float = 0.0
    """On the last rank: the multi-token-prediction block's activations, its layers kept for the micro-batches
    in flight like the rank's own, and its logits (Megatron-Core runs the MTP block after the last stage's
    layers and its own output projection and loss, mtp_layer.py)."""
    host_edges: tuple[float, float] = (0.0, 0.0)
    """The same for the embedding (first rank) and the output layer (last rank)."""
    graph_buffers: float = 0.0
    """CUDA graphs' static buffers on every rank (``cuda_graph_buffer_bytes``)."""
    tp_overlap_buffers: float = 0.0
    """Transformer Engine's userbuffers on every rank (``tp_overlap_buffer_bytes``)."""

    @property
    def fixed_bytes(self) -> float:
        """What every rank holds whatever its layers: the recompute workspace, the dispatcher's buffers,
        the reserve, CUDA graphs' buffers and the TP overlap's userbuffers."""
        return (
            self.recompute_workspace
            + self.dispatch_buffers
            + self.reserve
            + self.graph_buffers
            + self.tp_overlap_buffers
        )

    def host_bytes(self, rank: int, dense_layers: float, moe_layers: float) -> float:
        """Host memory of one pipeline rank's offloaded optimizer state."""
        fixed = (self.host_edges[0] if rank == 0 else 0.0) + (
            self.host_edges[1] if rank == len(self.in_flight) - 1 else 0.0
        )
        return dense_layers * self.host_per_layer[0] + moe_layers * self.host_per_layer[1] + fixed


def _bytes_per_param(p: ParallelConfig, dense: bool, precision: str) -> tuple[float, float, float, float]:
    """(weight, gradient, GPU optimizer, host optimizer) bytes per local parameter."""
    shard = (p.dp * p.cp if dense else p.edp) if (p.distributed_optimizer or p.fsdp) else 1
    if p.dp_sharding == "fsdp2":
        # FP32 parameter and gradient shards, Adam's FP32 m and v on them; the BF16 compute weights whole
        # while kept gathered from forward to backward (``distributed_optimizer``), not when resharded.
        gathered = 0.0 if p.fsdp else ACT_BYTES
        return (
            gathered + FSDP2_SHARD_BYTES[0] / shard,
            FSDP2_SHARD_BYTES[1] / shard,
            FSDP2_SHARD_BYTES[2] / shard,
            0.0,
        )
    gradient = p.optimizer.gradient_bytes
    gpu_state, host_state = optimizer_bytes_per_param(p.optimizer, precision, fsdp=p.fsdp)
    if p.fsdp:
        return 2.0 / shard, gradient / shard, gpu_state / shard, host_state / shard
    return 2.0, gradient, gpu_state / shard, host_state / shard


def optimizer_bytes_per_param(
    optimizer: OptimizerConfig, precision: str, fsdp: bool = False
) -> tuple[float, float]:
    """(GPU, host) bytes of optimizer state per parameter before sharding (module docstring). Under
    Megatron-FSDP the master is its own FP32 main-weight shard, never FusedAdam's remainders."""
    if optimizer.offloads:
        f = optimizer.offload_fraction
        return FP32_STATE_BYTES * (1.0 - f), HOST_STATE_BYTES * f
    if not optimizer.precision_aware:
        return FP32_STATE_BYTES, 0.0
    master = 2.0 if precision == "bf16" and optimizer.param_remainders and not fsdp else 4.0
    moments = 8.0 if optimizer.exp_avg_dtype == "fp32" else 4.0
    return master + moments, 0.0


def _in_flight(p: ParallelConfig, num_microbatches: int) -> tuple[float, ...]:
    """Micro-batches of activations each rank holds: 1F1B rank i holds min(m, pp - i); interleaved
    rank i holds ``2(pp-i-1) + (vpp-1)pp + 1`` virtual chunks (Megatron's warm-up count), 1/vpp each."""
    return _warm_up(p.pp, p.vpp, num_microbatches)


@lru_cache(maxsize=1024)
def _warm_up(pp: int, vpp: int, num_microbatches: int) -> tuple[float, ...]:
    if vpp == 1:
        return tuple(float(min(num_microbatches, pp - i)) for i in range(pp))
    chunks = [min(2 * (pp - i - 1) + (vpp - 1) * pp + 1, num_microbatches * vpp) for i in range(pp)]
    return tuple(c / vpp for c in chunks)


def memory_coefficients(
    model: ModelSpec, training: TrainingSpec, parallel: ParallelConfig, imbalance: float = 1.0
) -> MemoryCoefficients:
    """The coefficients of per-rank memory for a parallel layout (layers per rank still free)."""
    return MemoryModel(model, training).coefficients(parallel, imbalance)


class MemoryModel:
    """``memory_coefficients`` of one model and training run, for many layouts (a search's thousands).

    The model state reads only the degrees and the optimizer settings, the activations only the token
    split, recompute, imbalance and dispatcher: each part is computed once per distinct value of what it
    reads (same expressions, so the same figures as one layout at a time).
    """

    def __init__(self, model: ModelSpec, training: TrainingSpec) -> None:
        self.model, self.training = model, training
        self._states: dict[tuple[object, ...], _StatePart] = {}
        self._activations: dict[tuple[object, ...], _ActivationPart] = {}

    def coefficients(self, p: ParallelConfig, imbalance: float = 1.0) -> MemoryCoefficients:
        model, training = self.model, self.training
        state_key = (p.tp, p.pp, p.ep, p.etp, p.dp, p.cp, p.edp, p.distributed_optimizer, p.fsdp, p.optimizer,
                     p.fp8_param_gather, p.dp_sharding)  # fmt: skip
        states = self._states.get(state_key)
        if states is None:
            states = self._states[state_key] = _state_part(model, training, p)
        act_key = (p.tp, p.cp, p.ep > 1, p.micro_batch, p.sequence_parallel, p.recompute,
                   p.effective_recompute_modules, p.dispatcher.kind, imbalance, p.attention_backend)  # fmt: skip
        acts = self._activations.get(act_key)
        if acts is None:
            acts = self._activations[act_key] = _activation_part(model, training, p, imbalance)
        dense_state, moe_state, first_state, last_state, fsdp_workspace = states
        num_microbatches = max(1, training.global_batch // (p.micro_batch * p.dp))
        in_flight = _in_flight(p, num_microbatches)
        mtp_layer = acts.moe_layer if model.is_moe else acts.dense_layer
        mtp = model.mtp_num_layers * (in_flight[-1] * mtp_layer + acts.logits)
        return MemoryCoefficients(
            dense_layer_state=dense_state[:3],
            moe_layer_state=moe_state[:3],
            dense_layer_activations=acts.dense_layer,
            moe_layer_activations=acts.moe_layer,
            first_rank_state=first_state[:3],
            last_rank_state=last_state[:3],
            logits=acts.logits,
            recompute_workspace=acts.workspace + fsdp_workspace,  # the latter 0 without FSDP
            dispatch_buffers=acts.buffers,
            reserve=float(RESERVE_BYTES),
            graph_buffers=cuda_graph_buffer_bytes(p),
            tp_overlap_buffers=tp_overlap_buffer_bytes(model, training, p),
            in_flight=in_flight,
            dense_layer_parts=acts.dense_parts,
            moe_layer_parts=acts.moe_parts,
            part_scale=acts.scale,
            host_per_layer=(dense_state[3], moe_state[3]),
            host_edges=(first_state[3], last_state[3]),
            mtp_activations=mtp,
        )


_State = tuple[float, float, float, float]
_StatePart = tuple[_State, _State, _State, _State, float]
"""(dense layer, MoE layer, first rank, last rank) state as (weights, gradients, GPU optimizer, host
optimizer) bytes, and FSDP's gathered-weights workspace."""


def _state_part(model: ModelSpec, training: TrainingSpec, p: ParallelConfig) -> _StatePart:
    h = model.hidden_size
    # Split over TP: the attention's projections and the FFNs. Whole on every TP rank: the norms, MLA's
    # down-projections, the router (TopKRouter's weight is not split).
    whole = tp_replicated_attention_params(model)
    attention = attention_params(model) - whole
    dense_split = (attention + ffn_params(model, model.ffn_hidden_size)) / p.tp  # the GEMM weights
    dense_layer = dense_split + whole + h
    moe_split = moe_common = moe_expert = 0.0
    if model.num_experts is not None:
        moe_split = (attention + ffn_params(model, model.shared_expert_ffn_hidden_size)) / p.tp
        moe_common = moe_split + whole + h * model.num_experts + h
        moe_expert = model.num_experts * ffn_params(model, model.expert_ffn_hidden_size) / (p.ep * p.etp)
    dense_bytes = _bytes_per_param(p, dense=True, precision=training.precision)
    expert_bytes = _bytes_per_param(p, dense=False, precision=training.precision)

    (dw, dg, do, dh), (ew, eg, eo, eh) = dense_bytes, expert_bytes

    def state(dense_params: float, expert_params: float = 0.0) -> _State:
        """(weights, gradients, GPU optimizer, host optimizer) bytes of these parameters."""
        d, e = dense_params, expert_params
        return d * dw + e * ew, d * dg + e * eg, d * do + e * eo, d * dh + e * eh

    # Transformer Engine's FP8 GEMMs: torchtitan's FSDP2 runs torchao's Float8Linear instead, which keeps
    # no weight copy between micro-batches (nor does TE under FSDP2, ``is_fsdp2``).
    fp8 = training.precision in ("fp8", "mxfp8") and p.dp_sharding != "fsdp2"

    def with_fp8_copies(held: _State, dense_gemm: float, expert_gemm: float = 0.0) -> _State:
        """FP8 training's extra bytes on the GEMM weights: with ``fp8_param_gather``, MXFP8 primary weights'
        E8M0 scales on top of the two FP8 copies (``MXFP8_SCALE_BYTES``), sharded as the weights are;
        without it, Transformer Engine's cached FP8 copy of every BF16 GEMM weight the rank computes with
        (``FP8_WEIGHT_CACHE_BYTES``, whole, as the GEMM uses it)."""
        if not fp8:
            return held
        mx_scales = MXFP8_SCALE_BYTES if training.precision == "mxfp8" else 0.0
        if p.fp8_param_gather:
            extra = mx_scales * (dense_gemm * dw + expert_gemm * ew) / 2.0
        else:
            extra = (FP8_WEIGHT_CACHE_BYTES + mx_scales) * (dense_gemm + expert_gemm)
        return (held[0] + extra, *held[1:])

    vocab = model.vocab_size * h / p.tp
    last_vocab = vocab if (model.untie_embeddings_and_output_weights or p.pp > 1) else 0.0
    mtp = model.mtp_num_layers
    # Multi-token prediction: per layer a transformer layer and its 2h x h projection (a GEMM weight).
    if model.is_moe:
        last_state = state(last_vocab + mtp * (moe_common + 2 * h * h / p.tp), mtp * moe_expert)
        last_state = with_fp8_copies(last_state, mtp * (moe_split + 2 * h * h / p.tp), mtp * moe_expert)
    else:
        last_state = state(last_vocab + mtp * (dense_layer + 2 * h * h / p.tp))
        last_state = with_fp8_copies(last_state, mtp * (dense_split + 2 * h * h / p.tp))
    first_state = state(vocab)
    fsdp_workspace = 0.0
    if p.dp_sharding == "fsdp2" and (p.fsdp or p.distributed_optimizer):
        fsdp_workspace = _fsdp2_workspace(max(dense_layer, moe_common + moe_expert), resharded=p.fsdp)
    elif p.fsdp:
        # Megatron-FSDP's units are the transformer layers: the embedding and the output layer keep their
        # BF16 compute weights whole ("Non-unit modules remain persistently un-sharded").
        first_state = (vocab * 2.0, *first_state[1:])
        last_state = (last_state[0] + last_vocab * 2.0 * (1.0 - 1.0 / (p.dp * p.cp)), *last_state[1:])
        unit = max(dense_layer, moe_common + moe_expert)
        fsdp_workspace = _fsdp_workspace(model, p, unit, p.optimizer.gradient_bytes)
    dense_state = with_fp8_copies(state(dense_layer), dense_split)
    moe_state = with_fp8_copies(state(moe_common, moe_expert), moe_split, moe_expert)
    return dense_state, moe_state, first_state, last_state, fsdp_workspace


MXFP8_SCALE_BYTES = 2 / 32
"""Bytes a parameter of MXFP8 primary weights (``--fp8-param-gather`` under MXFP8) hold beyond BF16's 2:
rowwise and columnwise FP8 data (1 byte each) and an E8M0 scale per 32 elements in each direction
(Transformer Engine ``csrc/quantizer.cpp`` MXFP8Quantizer at d0067d0d). Blockwise FP8 keeps the same two
copies with an FP32 scale per 128 x 128 block, 2.0005 bytes: priced as BF16's 2."""

FP8_WEIGHT_CACHE_BYTES = 2.0
"""Bytes per GEMM weight parameter of Transformer Engine's FP8 weight cache when the parameters stay BF16
(FP8 training without ``--fp8-param-gather``): TE quantizes each weight on a step's first micro-batch and
keeps the FP8 copy, rowwise and columnwise (1 byte each; the backward's dgrad GEMM reads the transpose),
for the step's other micro-batches and on across steps (``Linear.forward``: ``cache_name = "weight"``
whenever ``is_first_microbatch`` is given, ``self._fp8_workspaces``; the same in ``GroupedLinear`` and
``LayerNormLinear``, TransformerEngine d0067d0d). Megatron-Core always gives it (``TELinear.forward``
passes ``is_first_microbatch`` unless ``disable_parameter_transpose_cache``, a TransformerConfig field that
Megatron-LM's arguments do not expose and that defaults to False; ``schedules.py`` sets it on each first
micro-batch; Megatron-LM d98e8a6). With ``--fp8-param-gather`` the FP8 weights are the parameters and
nothing is cached, which is the memory that option saves. MXFP8 adds its scales (``MXFP8_SCALE_BYTES``)."""

FSDP_PREFETCH_ELEMENTS = 500_000_000
"""Megatron-FSDP's all-gather prefetch without ``--suggested-communication-unit-size``: half of
``max(1e9, 2 x the mean unit)`` elements (megatron_fsdp.py:419-444 at Megatron-LM d98e8a6, the same in
core_v0.16.0); its prefetch loop gathers units until that many are in flight."""


def _fsdp_workspace(model: ModelSpec, p: ParallelConfig, unit: float, gradient_bytes: float) -> float:
    """Megatron-FSDP's unsharded buffers (``optim_grads_params``): the BF16 weights of the unit computing
    and of the units prefetched (``FSDP_PREFETCH_ELEMENTS``, or one unit if larger, at most the rest of an
    even pipeline stage), and the unsharded gradients of two units, the least the reduce-scatter overlap
    needs (docs/user-guide/features/megatron_fsdp.md: "at least two FSDP units worth")."""
    stage_units = -(-model.num_layers // p.pp)
    prefetched = min(max(float(FSDP_PREFETCH_ELEMENTS), unit), (stage_units - 1) * unit)
    return 2.0 * (unit + prefetched) + 2 * gradient_bytes * unit


FSDP2_SHARD_BYTES = (4.0, 4.0, 8.0)
"""(weights, gradients, Adam state) bytes per parameter that PyTorch FSDP2 shards as torchtitan runs it:
``fully_shard`` keeps the FP32 parameters as shards (DTensor), its ``MixedPrecisionPolicy(param_dtype=
bfloat16, reduce_dtype=float32)`` gathers them to BF16 for compute and reduce-scatters the gradients in FP32
into FP32 gradient shards, and ``torch.optim.AdamW`` keeps FP32 m and v of the shards (torchtitan
``parallelize.apply_fsdp``, ``mixed_precision_param = "bfloat16"``, ``mixed_precision_reduce = "float32"``
defaults, pytorch/torchtitan; ``torch/distributed/fsdp/_fully_shard/_fsdp_param.py``). No separate master:
the shard is it (16 bytes over N against Megatron's 2 + 4 + 12/N)."""


def _fsdp2_workspace(unit: float, resharded: bool) -> float:
    """FSDP2's unsharded buffers besides the state: the BF16 weights of the unit computing and of the one
    prefetched (FSDP2 prefetches one module ahead in forward and backward) when resharded after forward
    (kept whole otherwise: in the weights); the unit's unsharded BF16 gradient and its FP32 copy for the
    reduce-scatter (``foreach_reduce`` casts to ``reduce_dtype``), ``unit`` the parameters of the largest
    layer on the rank."""
    gathered = 2 * ACT_BYTES * unit if resharded else 0.0
    return gathered + (ACT_BYTES + 4.0) * unit


def unfused_score_bytes(model: ModelSpec, seq_len: int) -> float:
    """Bytes unfused attention keeps per query token of one layer: the BF16 softmax output, one score per
    head and key (Megatron-Core's DotProductAttention saves ``attention_probs`` for the backward of its
    softmax and of ``probs @ V``; the fused scale-mask-softmax does not save its input). Without attention
    dropout, which moeplan's plans do not use (the emitter writes ``--attention-dropout 0``)."""
    return float(ACT_BYTES * model.num_attention_heads * seq_len)


@dataclass(frozen=True, slots=True)
class _ActivationPart:
    dense_layer: float
    moe_layer: float
    logits: float
    workspace: float
    """A full-recompute layer's activations while it is recomputed."""
    buffers: float
    dense_parts: tuple[tuple[str, float, float], ...]
    moe_parts: tuple[tuple[str, float, float], ...]
    scale: tuple[float, float]


def _activation_part(
    model: ModelSpec, training: TrainingSpec, p: ParallelConfig, imbalance: float
) -> _ActivationPart:
    h = model.hidden_size
    tokens = p.micro_batch * training.seq_len / p.cp / p.tp  # per rank, sequence-parallel split
    replicated = p.tp if (p.tp > 1 and not p.sequence_parallel) else 1  # hidden-sized tensors without SP
    fp8 = training.precision in ("fp8", "mxfp8")

    # Unfused attention keeps its softmax output, a x s scores per query token (split over TP by heads),
    # unless core attention is recomputed.
    scores = unfused_score_bytes(model, training.seq_len) if p.attention_backend == "unfused" else 0.0
    kept_scores = 0.0 if p.recompute == "full" or "core_attn" in p.effective_recompute_modules else scores

    def per_token(moe: bool) -> float:
        hidden, sharded = _layer_activation_bytes(model, p, moe, imbalance, fp8)
        return hidden * replicated + sharded + kept_scores

    def per_layer_parts(moe: bool) -> tuple[tuple[str, float, float], ...]:
        parts = activation_parts(model, p.recompute, p.effective_recompute_modules, moe, imbalance, fp8)
        return (*parts, ("attention scores (unfused)", 0.0, kept_scores)) if kept_scores else parts

    workspace = 0.0
    if p.recompute == "full":
        hidden, sharded = _activation_bytes(model, "none", (), model.is_moe, imbalance, fp8)  # no recompute
        workspace = tokens * (hidden * replicated + sharded + scores)
    buffers = 0.0
    if model.is_moe and p.ep > 1:
        routed = ACT_BYTES * tokens * replicated * (model.moe_router_topk or 1) * imbalance * h
        buffers = dispatcher(p.dispatcher.kind).buffer_bytes(routed)
    return _ActivationPart(
        dense_layer=tokens * per_token(False),
        moe_layer=tokens * per_token(True) if model.is_moe else 0.0,
        # The output layer is vocabulary-parallel (parallel_output, gpt_model.py): each TP rank holds the
        # whole gathered sequence's logits over V / tp, tokens x tp x V / tp with or without SP.
        logits=tokens * model.vocab_size * (ACT_BYTES + 4),
        workspace=workspace,
        buffers=buffers,
        dense_parts=per_layer_parts(False),
        moe_parts=per_layer_parts(True) if model.is_moe else (),
        scale=(tokens, float(replicated)),
    )


def with_optimizer(
    mem: MemoryCoefficients, old: OptimizerConfig, new: OptimizerConfig, precision: str
) -> MemoryCoefficients:
    """``mem`` (priced with optimizer settings ``old``) with the optimizer state of ``new`` instead: the same
    as ``memory_coefficients`` of the layout with ``new``, without pricing its activations again. The
    state scales with its bytes per parameter; ``new`` must keep ``old``'s gradient dtype."""
    if old.main_grads_dtype != new.main_grads_dtype:
        raise ValueError("with_optimizer keeps the gradient dtype")
    old_gpu, old_host = optimizer_bytes_per_param(old, precision)
    new_gpu, new_host = optimizer_bytes_per_param(new, precision)
    if old_host or not old_gpu:
        raise ValueError("with_optimizer starts from settings that keep all the state on the GPU")
    scale, host = new_gpu / old_gpu, new_host / old_gpu

    def state(values: tuple[float, float, float]) -> tuple[float, float, float]:
        return values[0], values[1], values[2] * scale

    return replace(
        mem,
        dense_layer_state=state(mem.dense_layer_state),
        moe_layer_state=state(mem.moe_layer_state),
        first_rank_state=state(mem.first_rank_state),
        last_rank_state=state(mem.last_rank_state),
        host_per_layer=(mem.dense_layer_state[2] * host, mem.moe_layer_state[2] * host),
        host_edges=(mem.first_rank_state[2] * host, mem.last_rank_state[2] * host),
    )


def rank_memory(
    coeffs: MemoryCoefficients, rank: int, dense_layers: int, moe_layers: int, by_module: bool = True
) -> MemoryBreakdown:
    """Peak bytes of one pipeline rank holding the given layers; ``by_module=False`` leaves
    ``activations_by_module`` empty (the totals are the same), for a rank whose breakdown is not shown."""
    pp = len(coeffs.in_flight)
    parts = [
        dense_layers * d + moe_layers * m
        for d, m in zip(coeffs.dense_layer_state, coeffs.moe_layer_state, strict=True)
    ]
    for edge, held in ((coeffs.first_rank_state, rank == 0), (coeffs.last_rank_state, rank == pp - 1)):
        if held:
            parts = [a + b for a, b in zip(parts, edge, strict=True)]
    activations = coeffs.in_flight[rank] * (
        dense_layers * coeffs.dense_layer_activations + moe_layers * coeffs.moe_layer_activations
    )
    mtp = coeffs.mtp_activations if rank == pp - 1 else 0.0
    return MemoryBreakdown(
        weights=parts[0],
        gradients=parts[1],
        optimizer=parts[2],
        activations=activations + mtp + coeffs.recompute_workspace,
        activations_by_module=_by_module(coeffs, rank, dense_layers, moe_layers, mtp) if by_module else (),
        logits=coeffs.logits if rank == pp - 1 else 0.0,
        dispatch_buffers=coeffs.dispatch_buffers,
        reserve=coeffs.reserve,
        graph_buffers=coeffs.graph_buffers,
        tp_overlap_buffers=coeffs.tp_overlap_buffers,
        host_optimizer=coeffs.host_bytes(rank, dense_layers, moe_layers),
    )


def _by_module(
    coeffs: MemoryCoefficients, rank: int, dense_layers: int, moe_layers: int, mtp: float
) -> tuple[tuple[str, float], ...]:
    """A rank's activations by the module that keeps them (``rank_memory``'s, summing to its activations)."""
    modules: dict[str, float] = {}
    tokens, copies = coeffs.part_scale
    for layers, layer_parts in (
        (dense_layers, coeffs.dense_layer_parts),
        (moe_layers, coeffs.moe_layer_parts),
    ):
        for name, hidden, sharded in layer_parts:
            if layers:
                amount = tokens * (hidden * copies + sharded)
                modules[name] = modules.get(name, 0.0) + coeffs.in_flight[rank] * layers * amount
    if mtp:
        modules["MTP block (its layers and logits)"] = mtp
    if coeffs.recompute_workspace:
        modules["workspace (a layer recomputed, FSDP's gathered weights)"] = coeffs.recompute_workspace
    return tuple(modules.items())


def estimate_memory(
    model: ModelSpec,
    training: TrainingSpec,
    parallel: ParallelConfig,
    imbalance: float = 1.0,
    ranks: list[tuple[int, int]] | None = None,
) -> MemoryBreakdown:
    """Peak bytes per GPU: the busiest pipeline rank for the given (dense, moe) layers per rank
    (default: the even split ``split_layers`` makes)."""
    coeffs = memory_coefficients(model, training, parallel, imbalance)
    ranks = ranks if ranks is not None else split_layers(model, parallel)
    return max((rank_memory(coeffs, i, d, m) for i, (d, m) in enumerate(ranks)), key=lambda b: b.total)


def split_chunks(model: ModelSpec, p: ParallelConfig) -> list[tuple[int, int]]:
    """(dense, moe) layers of each of the pp*vpp chunks, in order: the first layers are the dense ones.

    ``layers_per_stage`` when given, else an even split with the remainder on the first chunks.
    """
    chunks = p.pp * p.vpp
    if p.layers_per_stage is not None and len(p.layers_per_stage) == chunks:
        sizes = list(p.layers_per_stage)
    else:
        base, extra = divmod(model.num_layers, chunks)
        sizes = [base + (1 if c < extra else 0) for c in range(chunks)]
    out, start = [], 0
    for size in sizes:
        dense = max(0, min(start + size, model.num_dense_layers) - start)
        out.append((dense, size - dense))
        start += size
    return out


def ranks_of(chunks: list[tuple[int, int]], pp: int) -> list[tuple[int, int]]:
    """(dense, moe) layers per pipeline rank: chunk c runs on rank c mod pp (Megatron's interleaving)."""
    ranks = [[0, 0] for _ in range(pp)]
    for c, (dense, moe) in enumerate(chunks):
        ranks[c % pp][0] += dense
        ranks[c % pp][1] += moe
    return [(d, m) for d, m in ranks]


def split_layers(model: ModelSpec, p: ParallelConfig) -> list[tuple[int, int]]:
    """(dense, moe) layers held by each pipeline rank for the plan's (or the even) split."""
    return ranks_of(split_chunks(model, p), p.pp)
