"""Plan: a parallel layout with its micro-batch, recompute and dispatcher choices, and its estimate.

Degree legend (Megatron's names on the left; short names on the Plan):
tp = --tensor-model-parallel-size, pp = --pipeline-model-parallel-size, vpp = virtual stages per
pipeline rank, cp = --context-parallel-size, ep = --expert-model-parallel-size,
etp = --expert-tensor-parallel-size, dp = world / (tp*cp*pp) (dense data parallel),
edp = world / (etp*ep*pp) (expert data parallel; Megatron's parallel folding, ecosystem.md §1.5).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from planner.schema._base import Spec
from planner.schema.training import TrainingSpec

_BOOL = TypeAdapter(bool)
"""Pydantic's reading of a boolean field, for a validator that runs before the fields are read."""

__all__ = [
    "PLAN_SCHEMA_VERSION",
    "CUDA_GRAPH_SCOPES",
    "RECOMPUTE_MODULES",
    "ClusterRef",
    "CudaGraphScope",
    "CostTerm",
    "DispatcherBackend",
    "DispatcherKind",
    "DispatcherName",
    "DispatcherSpec",
    "Estimate",
    "MeshAxis",
    "ModelRef",
    "OptimizerConfig",
    "ParallelConfig",
    "Plan",
    "PlanProvenance",
    "SolverInfo",
]

PLAN_SCHEMA_VERSION: Literal[3] = 3
"""Bump on any change to the plan document, so golden plans migrate deliberately. Version 2 records the
node shape and where the model and the cluster profile came from (``ModelRef``, ``ClusterRef``);
version 3 the model-state settings (``parallel.optimizer``). ``planner.emit.plan_json.load_plan``
migrates older plans where it can (see there)."""


class MeshAxis(StrEnum):
    """Mesh axis names shared by search, emitters and runtime."""

    TP = "tp"
    CP = "cp"
    EP = "ep"
    ETP = "etp"
    DP = "dp"
    EDP = "edp"
    PP = "pp"


DispatcherKind = Literal["allgather", "alltoall", "hierarchical", "monta"]
"""Token dispatcher algorithms. Each has one module on each side of the planning/runtime wall
(``planner/costmodel/dispatchers/<kind>.py``, ``planner/runtime/dispatchers/<kind>.py``); a test keeps
this list and both registries in step."""
DispatcherBackend = Literal["deepep", "hybridep"]
"""Kernel libraries of the hierarchical dispatcher (Megatron ``--moe-flex-dispatcher-backend``)."""
DispatcherName = DispatcherKind | DispatcherBackend
"""What ``--dispatcher`` accepts: a kind, or a kernel library standing for its kind on that library."""

RECOMPUTE_MODULES: tuple[str, ...] = (
    "core_attn",
    "moe_act",
    "layernorm",
    "mla_up_proj",
    "mlp",
    "moe",
    "shared_experts",
)
"""Megatron's ``--recompute-modules`` names that moeplan prices (ecosystem.md §1.4)."""
RecomputeModule = Literal["core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts"]

CUDA_GRAPH_SCOPES: tuple[str, ...] = ("attn", "mlp", "moe_router", "moe_preprocess", "full_iteration")
"""Megatron-Core's ``--cuda-graph-scope`` names that moeplan prices, in the order a plan keeps them
(core_v0.16.1 ``CudaGraphScope``; ``moe`` (drop-and-pad MoE layers only) and ``mamba`` are not priced)."""
CudaGraphScope = Literal["attn", "mlp", "moe_router", "moe_preprocess", "full_iteration"]


class DispatcherSpec(Spec):
    """How MoE tokens reach their experts and come back, with the options of each algorithm."""

    kind: DispatcherKind = "alltoall"
    """``alltoall`` (flat NCCL all-to-all), ``allgather`` (Megatron's all-gather dispatcher),
    ``hierarchical`` (node-deduplicated: DeepEP / Hybrid-EP), ``monta`` (TP-deduplicated all-to-all
    pipelined with the intra-node all-gather)."""
    backend: DispatcherBackend | None = None
    """Kernel library of the hierarchical dispatcher (Megatron ``--moe-flex-dispatcher-backend``).
    Rule: only with ``hierarchical``."""
    num_sms: PositiveInt | None = None
    """SMs the DeepEP or Hybrid-EP kernels run on (Megatron's ``--moe-deepep-num-sms`` /
    ``--moe-hybridep-num-sms``, ``--moe-flex-dispatcher-num-sms`` from core 0.19). None: Megatron-Core
    0.16's defaults, DeepEP 20 and Hybrid-EP 16, which the emitted arguments then state. Fewer SMs than
    that move the tokens proportionally slower; more gain nothing and take more from overlapped compute
    (``costmodel.dispatchers.hierarchical``). Rule: only with ``hierarchical``, and fewer than the GPU's."""
    num_chunks: PositiveInt = 1
    """Chunks the ``monta`` dispatcher pipelines (MoNTA's ``shard_num``; its code uses 4).
    Rule: above 1 only with ``monta``."""
    topology_aware_routing: bool = False
    """TA-MoE's topology-aware dispatch proportions (alters the model's routing; off by default)."""
    condense_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Luffy's token condensation: fraction rho of routed tokens condensed before dispatch
    (alters the model's numerics; 0 = off). Rule: 0 <= rho < 1."""
    sequence_migration: bool = False
    """Luffy's sequence migration at combine (moves attention work between GPUs; off by default)."""

    @model_validator(mode="after")
    def _options_match_kind(self) -> DispatcherSpec:
        if self.backend is not None and self.kind != "hierarchical":
            raise ValueError(
                f"backend '{self.backend}' is only used by the hierarchical dispatcher, not '{self.kind}'"
            )
        if self.num_sms is not None and self.kind != "hierarchical":
            raise ValueError(
                f"num_sms ({self.num_sms}) is only used by the hierarchical dispatcher, not '{self.kind}'"
            )
        if self.num_chunks > 1 and self.kind != "monta":
            raise ValueError(f"num_chunks ({self.num_chunks}) above 1 is only used by the monta dispatcher")
        return self


StateDtype = Literal["fp32", "bf16"]


class OptimizerConfig(Spec):
    """Where and in which precision the model state lives: Megatron's gradient buffer, Adam and offload.

    Megatron-LM's defaults under ``--bf16`` are FP32 main gradients and FP32 Adam state (arguments.py,
    ``accumulate_allreduce_grads_in_fp32``). BF16 gradients or moments change the numerics of training,
    so the search never picks them: they are the user's (``solve --main-grads-dtype``,
    ``--exp-avg-dtype``). The precision-aware optimizer with FP32 dtypes and CPU offload keep them.
    """

    main_grads_dtype: StateDtype = "fp32"
    """Gradient buffer dtype: fp32 (``--accumulate-allreduce-grads-in-fp32``, Megatron-LM's default under
    ``--bf16``) or bf16 (``--grad-reduce-in-bf16``; Megatron-Core's and Megatron-Bridge's default)."""
    precision_aware: bool = False
    """``--use-precision-aware-optimizer``: Transformer Engine's FusedAdam keeps the master weights; under
    BF16 as the 16 bits a BF16 weight lacks of its FP32 value (``store_param_remainders``), 2 bytes."""
    exp_avg_dtype: StateDtype = "fp32"
    """Adam's moments (``--exp-avg-dtype`` and ``--exp-avg-sq-dtype``). Rule: bf16 needs ``precision_aware``."""
    param_remainders: bool = True
    """Under ``precision_aware`` with BF16 weights, the master weights are kept as remainders, 2 bytes
    (Megatron-Core's ``store_param_remainders``, default True, optimizer_config.py:192). False: a full FP32
    master, 4 bytes. That is what Megatron-Core keeps when it does not hand the master weights to
    Transformer Engine's FusedAdam: ``use_precision_aware_optimizer_no_fp8_or_ds_fp8`` is false when an
    FP8 recipe other than delayed is set (optimizer_config.py:404-411; __init__.py:576-586;
    distrib_optimizer.py:422-445). Megatron-Bridge's MixedPrecisionConfig sets 'tensorwise' even for BF16
    runs (mixed_precision.py:50-52, copied at 148-156), so its precision-aware recipes keep FP32 masters.
    Megatron-LM has no flag for it, so solve never sets it and the emitter refuses it; a validation run
    states it. Rule: False needs ``precision_aware``."""
    offload_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of the optimizer state (and its Adam step) held on the host (``--optimizer-cpu-offload
    --optimizer-offload-fraction``; 0 = none). Rule: above 0 needs ``precision_aware`` (Megatron's
    validate_args) and FP32 moments (the host Adam keeps its own FP32 state)."""
    overlap_offload: bool = False
    """``--overlap-cpu-optimizer-d2h-h2d``: copies to and from the host overlap the host's Adam.
    Rule: only with offload."""

    @model_validator(mode="after")
    def _dependencies(self) -> OptimizerConfig:
        if self.exp_avg_dtype != "fp32" and not self.precision_aware:
            raise ValueError(
                f"exp_avg_dtype '{self.exp_avg_dtype}' needs precision_aware (--use-precision-aware-optimizer)"
            )
        if self.offload_fraction > 0 and not self.precision_aware:
            raise ValueError(
                "offload_fraction above 0 needs precision_aware: Megatron's optimizer CPU offload must be used "
                "with --use-precision-aware-optimizer"
            )
        if self.offload_fraction > 0 and self.exp_avg_dtype != "fp32":
            raise ValueError(
                "offload_fraction above 0 keeps FP32 moments on the host: exp_avg_dtype must be fp32"
            )
        if not self.param_remainders and not self.precision_aware:
            raise ValueError(
                "param_remainders false (a full FP32 master) only differs under precision_aware: "
                "Megatron-LM's own optimizer keeps FP32 masters"
            )
        if self.overlap_offload and self.offload_fraction == 0:
            raise ValueError("overlap_offload is only used with offload_fraction above 0")
        return self

    @property
    def offloads(self) -> bool:
        return self.offload_fraction > 0

    @property
    def gradient_bytes(self) -> float:
        """Bytes of one element of the gradient buffer (and of the gradient reduce-scatter)."""
        return 4.0 if self.main_grads_dtype == "fp32" else 2.0

    @property
    def summary(self) -> str:
        """One line for reports: what differs from Megatron-LM's defaults, or that nothing does."""
        parts = []
        if self.main_grads_dtype != "fp32":
            parts.append(f"{self.main_grads_dtype.upper()} gradients")
        if self.precision_aware:
            moments = "" if self.exp_avg_dtype == "fp32" else f", {self.exp_avg_dtype.upper()} moments"
            master = "" if self.param_remainders else ", FP32 master"
            parts.append(f"precision-aware optimizer{master}{moments}")
        if self.offloads:
            overlapped = ", copies overlapped" if self.overlap_offload else ""
            parts.append(f"{self.offload_fraction:.0%} of the optimizer on the CPU{overlapped}")
        return (
            "; ".join(parts)
            if parts
            else "Adam on the GPU, FP32 gradients and state (Megatron-LM's defaults)"
        )


class ParallelConfig(Spec):
    """Parallel degrees and per-step choices. Rules across objects live in ``planner.feasibility``."""

    tp: PositiveInt = 1
    """Tensor parallel degree of attention and dense layers."""
    pp: PositiveInt = 1
    """Pipeline stages."""
    vpp: PositiveInt = 1
    """Virtual (interleaved) stages per pipeline rank; 1 means plain 1F1B. Rule: above 1 needs pp above 1."""
    cp: PositiveInt = 1
    """Context parallel degree (sequence split for attention)."""
    ep: PositiveInt = 1
    """Expert parallel degree. Rule: divides num_experts."""
    etp: PositiveInt = 1
    """Expert tensor parallel degree (each expert's FFN split over etp ranks)."""
    dp: PositiveInt = 1
    """Dense data parallel degree = world / (tp*cp*pp)."""
    edp: PositiveInt = 1
    """Expert data parallel degree = world / (etp*ep*pp)."""
    micro_batch: PositiveInt = 1
    """Sequences per micro-batch (``--micro-batch-size``)."""
    sequence_parallel: bool = True
    """Megatron sequence parallelism in the TP group. Rule: required for MoE with tp above 1."""
    tp_comm_overlap: bool = False
    """Megatron's ``--tp-comm-overlap``: Transformer Engine's userbuffers overlap the sequence-parallel
    all-gathers and reduce-scatters of the attention and dense FFN (or shared-expert) linears with their
    GEMMs (``costmodel.layer_terms``), holding communication buffers (``costmodel.memory``). Off: the
    collectives run between the GEMMs (Megatron-LM's default). Rule 17: needs tp above 1 with sequence
    parallelism, and no MLA (Megatron-Core turns it off for MLA's projections)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation granularity (``--recompute-granularity``)."""
    recompute_modules: tuple[RecomputeModule, ...] = ()
    """Modules recomputed under ``selective`` (Megatron's default when empty: ``core_attn``).
    Rule: only with ``selective``."""
    distributed_optimizer: bool = True
    """Optimizer states sharded over dp (dense) and edp (experts) (``--use-distributed-optimizer``)."""
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    """Gradient and optimizer-state precision, and CPU offload of the optimizer."""
    fsdp: bool = False
    """Fully sharded data parallelism (Megatron-FSDP ``optim_grads_params``): parameters, gradients and
    optimizer states sharded over dp/edp, parameters all-gathered per layer in forward and backward."""
    dp_sharding: Literal["megatron", "fsdp2"] = "megatron"
    """Which library shards the data-parallel state when ``distributed_optimizer`` or ``fsdp`` is on:
    ``megatron`` (Megatron-Core's distributed optimizer, Megatron-FSDP) or ``fsdp2`` (PyTorch's
    ``fully_shard`` as torchtitan runs it: FP32 parameter shards and FP32 sharded gradients, BF16 compute
    weights gathered, FP32 gradient reduction; ``distributed_optimizer`` keeps the gathered weights from
    forward to backward, ``fsdp`` reshards them after forward). Rule (``planner.feasibility``): ``fsdp2``
    needs one of the two, and the default optimizer settings (FP32 gradients and Adam state, on the GPU)."""
    fp8_param_gather: bool = False
    """``--fp8-param-gather``: Transformer Engine keeps the GEMM weights (attention projections, MLP,
    experts) in FP8 and the distributed optimizer or FSDP gathers them in FP8, 1 byte a parameter where BF16
    takes 2 (under MXFP8 Megatron gathers BF16 and quantizes after: no saving). Rules
    (``planner.feasibility``): FP8 training, the distributed optimizer or FSDP, and no optimizer CPU offload
    with moeplan's FP8 recipes (Megatron allows that only with the delayed recipe)."""
    attention_backend: Literal["fused", "unfused"] = "fused"
    """Core attention's kernels: ``fused`` (FlashAttention or cuDNN's fused attention, Megatron-LM's
    ``--attention-backend auto``), which keeps no score matrix, or ``unfused`` (``--attention-backend
    unfused``), which keeps each layer's softmax output, ``2 a s^2 b / tp`` bytes a micro-batch, and moves
    the scores through HBM. The search never picks ``unfused``; plan and validation files may state it.
    Rule: ``unfused`` needs cp 1."""
    cuda_graphs: tuple[CudaGraphScope, ...] = ()
    """What CUDA graphs capture (Megatron-Core's ``--cuda-graph-scope``); empty: none, every kernel launched
    eagerly (``--cuda-graph-impl none``, Megatron's default). ``attn``, ``mlp`` (dense layers),
    ``moe_router`` and ``moe_preprocess`` are Transformer Engine's per-layer graphs (``--cuda-graph-impl
    transformer_engine``): their kernels cost the host a graph replay, not a launch each. ``full_iteration``
    (``--cuda-graph-impl local``) captures forward and backward whole: no per-kernel host cost at all.
    Either holds static buffers (``costmodel.memory.CUDA_GRAPH_BUFFER_BYTES``). The search never turns them
    on unless asked (``solve --cuda-graphs``); plan and validation files may state them. Rules
    (``planner.feasibility``, Megatron-Core core_v0.16.1 ``TransformerConfig.__post_init__``)."""
    grouped_gemm: bool = True
    """The routed experts' GEMMs run as one grouped GEMM (``--moe-grouped-gemm``); off, each local expert's
    GEMMs are launched one by one (Megatron's SequentialMLP). Rule: needs compute capability 8.0 or more."""
    moe_router_fusion: bool = True
    """Megatron-Core's ``--moe-router-fusion`` (core 0.14 on, Transformer Engine 2.7 on): the router's top-k,
    score function and auxiliary-loss kernels fused, 72 forward kernels of the router and the dispatch
    preprocessing down to 31 (Megatron-LM's DeepSeek-V3 GB200 guide §2.1.4), which the host launches a layer
    fewer (``costmodel.dispatchers.UNFUSED_ROUTER_KERNELS``). Megatron-LM's default is off; its MoE guide
    ("Enable kernel fusions") and Megatron-Bridge's performance recipes turn it on, and so does the search.
    Plans for torchtitan and the bundled runtime, which have no Transformer Engine router, carry it off; one
    that does not state it and shards with FSDP2 (``dp_sharding: fsdp2``, torchtitan's) has it off."""
    a2a_overlap: bool = False
    """Overlap EP all-to-all with compute of another micro-batch (``--overlap-moe-expert-parallel-comm``)."""
    delay_wgrad_compute: bool = False
    """Megatron's ``--delay-wgrad-compute``: under EP overlap each layer's weight gradients run after its
    backward dispatch is issued, so the dispatch waits for the data gradients only
    (``costmodel.ep_overlap``). Megatron-LM's default is off; the search turns it on with ``a2a_overlap``
    (never slower), and a plan that does not state it has it on with ``a2a_overlap``, as moeplan's
    Megatron arguments always asked for it before the setting existed. Rule 18: needs ``a2a_overlap``."""
    overlap_grad_reduce: bool = True
    """Megatron's ``--overlap-grad-reduce`` (with the distributed optimizer also ``--overlap-param-gather``):
    the data-parallel gradient reduction runs during the last micro-batch's backward and the parameter
    all-gather during the first micro-batch's forward (``costmodel.data_parallel``). Off, the reduction waits
    for the backward to end and the gather runs before the forward: both are exposed. Megatron-LM's default
    is off; the search keeps it on (it is never slower), and plan and validation files may turn it off.
    With ``fsdp`` (Megatron-FSDP) the switch is the same: off, each layer's gathers and reductions run in
    line. Rule 16: ``dp_sharding: fsdp2`` (torchtitan's FSDP2) always overlaps."""
    dispatcher: DispatcherSpec = Field(default_factory=DispatcherSpec)
    """Token dispatcher and its options."""
    layers_per_stage: tuple[NonNegativeInt, ...] | None = None
    """Decoder layers of each (virtual) pipeline stage in order, when uneven; null means an even split.
    Rule: pp*vpp entries summing to num_layers."""

    @model_validator(mode="before")
    @classmethod
    def _router_fusion_follows_fsdp2(cls, data: Any) -> Any:
        """A configuration that does not state ``moe_router_fusion`` and shards with FSDP2 is torchtitan's
        (plans written before the setting existed included): its router is not Transformer Engine's."""
        if isinstance(data, dict) and "moe_router_fusion" not in data and data.get("dp_sharding") == "fsdp2":
            return {**data, "moe_router_fusion": False}
        return data

    @model_validator(mode="before")
    @classmethod
    def _delayed_wgrad_follows_overlap(cls, data: Any) -> Any:
        """A configuration that does not state ``delay_wgrad_compute`` delays the weight gradients with EP
        overlap: moeplan emitted ``--delay-wgrad-compute`` beside every ``--overlap-moe-expert-parallel-comm``
        before the setting existed, so plans written then keep their arguments and their price."""
        if not isinstance(data, dict) or "delay_wgrad_compute" in data or data.get("a2a_overlap") is None:
            return data
        try:
            overlap = _BOOL.validate_python(data["a2a_overlap"])
        except ValidationError:
            return data  # the field's own validation names the value
        return {**data, "delay_wgrad_compute": overlap}

    @model_validator(mode="after")
    def _modules_need_selective(self) -> ParallelConfig:
        if self.recompute_modules and self.recompute != "selective":
            raise ValueError(
                f"recompute_modules are only used with recompute 'selective', not '{self.recompute}'"
            )
        return self

    @field_validator("cuda_graphs")
    @classmethod
    def _canonical_graph_scopes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """One order and no repeats, so that equal settings give byte-identical plans."""
        return tuple(scope for scope in CUDA_GRAPH_SCOPES if scope in value)

    @property
    def effective_recompute_modules(self) -> tuple[str, ...]:
        """Modules actually recomputed, resolving Megatron's ``core_attn`` default."""
        if self.recompute != "selective":
            return ()
        return self.recompute_modules or ("core_attn",)

    def degree(self, axis: MeshAxis) -> int:
        """The degree of one mesh axis."""
        value: int = getattr(self, axis.value)
        return value

    @classmethod
    def for_world(cls, world_size: int, **degrees: object) -> ParallelConfig:
        """Build a config whose dp and edp fill ``world_size`` (floor division; feasibility checks the rest).

        >>> ParallelConfig.for_world(16, tp=2, pp=2, ep=4).dp
        4
        """
        config = cls.model_validate(degrees)
        dense = config.tp * config.cp * config.pp
        expert = config.etp * config.ep * config.pp
        return config.model_copy(
            update={"dp": max(world_size // dense, 1), "edp": max(world_size // expert, 1)}
        )


class CostTerm(Spec):
    """One term of an estimate: its total time and the part not hidden behind other work."""

    name: str
    """What it is, e.g. ``compute``, ``ep_dispatch``, ``dp_grad_reduce_scatter``, ``pipeline_bubble``."""
    total_s: NonNegativeFloat
    """Seconds per step if it ran alone."""
    exposed_s: NonNegativeFloat
    """Seconds per step it adds to the critical path after overlap."""
    link_class: str | None = None
    """Link class it crosses, for communication terms."""


class MemoryUse(Spec):
    """Bytes on the GPU whose memory peaks highest (the busiest pipeline rank), by what holds them."""

    pipeline_rank: NonNegativeInt
    """The pipeline rank (0 = first stage) these bytes are on."""
    weights: NonNegativeFloat
    """Parameters in the training precision."""
    gradients: NonNegativeFloat
    """Main gradients (FP32 by Megatron-LM's default, BF16 with ``main_grads_dtype: bf16``)."""
    optimizer: NonNegativeFloat
    """Optimizer state on the GPU: master weights and Adam's two moments, sharded with the distributed
    optimizer, less the share offloaded to the host."""
    activations: NonNegativeFloat
    """Activations stored for the backward pass of every micro-batch in flight, plus full recompute's
    workspace."""
    in_flight_microbatches: NonNegativeFloat
    """Micro-batches whose activations this rank holds at its peak (pipeline warm-up; fractional when
    interleaved, the average over its virtual stages)."""
    logits: NonNegativeFloat
    """Logits and their softmax for the current micro-batch (last pipeline rank)."""
    dispatch_buffers: NonNegativeFloat
    """The token dispatcher's buffers (DeepEP/Hybrid-EP's reserved buffers, all-to-all send/receive copies)."""
    reserve: NonNegativeFloat
    """CUDA context, NCCL and allocator: a fixed reserve (``costmodel.memory.RESERVE_BYTES``)."""
    cuda_graph_buffers: NonNegativeFloat = 0.0
    """CUDA graphs' static buffers (``costmodel.memory.cuda_graph_buffer_bytes``; 0 without graphs)."""
    tp_overlap_buffers: NonNegativeFloat = 0.0
    """Transformer Engine's userbuffers for ``tp_comm_overlap`` (``costmodel.memory.tp_overlap_buffer_bytes``;
    0 without it)."""
    host_optimizer: NonNegativeFloat = 0.0
    """Host (CPU) memory this GPU's offloaded optimizer state takes (not part of the GPU's peak)."""
    activations_by_module: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    """``activations`` by the module that keeps them (residual stream, norm outputs, attention, MLP, router
    scores, routed and shared experts; a layer's input under full recompute, and the workspace), in the
    layer's order; they sum to ``activations``."""


class Estimate(Spec):
    """The cost model's prediction for one plan on one cluster."""

    step_time_s: NonNegativeFloat
    """Seconds per optimizer step."""
    tokens_per_s_per_gpu: NonNegativeFloat
    """Training tokens per second per GPU."""
    model_tflops_per_gpu: NonNegativeFloat
    """Model FLOPs (Megatron's count, recompute excluded) per second per GPU, TFLOP/s."""
    mfu: NonNegativeFloat
    """Model FLOPs utilisation: model TFLOP/s per GPU over the dense BF16 peak (FP16's where the GPU has no
    BF16; ``mfu_peak`` says which), whatever the training precision: the validation format's definition."""
    mfu_peak: Literal["bf16", "fp16"] = "bf16"
    """The peak ``mfu`` is over."""
    mfu_fp8: NonNegativeFloat | None = None
    """For FP8 and MXFP8 training, model TFLOP/s over the dense FP8 peak, which its GEMMs run against (half
    of ``mfu`` on Hopper and Blackwell, whose FP8 peak is twice BF16's); None otherwise."""
    peak_memory_bytes: NonNegativeFloat
    """Peak device memory of the busiest GPU, bytes."""
    fits: bool
    """Whether the peak memory fits the GPU."""
    memory: MemoryUse | None = None
    """Where the peak memory goes, on the GPU where it is reached."""
    breakdown: tuple[CostTerm, ...] = ()
    """Every term of the step time."""
    bytes_per_link_class: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    """Bytes per GPU per step crossing each link class in the per-micro-batch collectives (TP, CP, EP
    dispatch and combine, PP)."""
    gradient_bytes_per_link_class: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    """Bytes per GPU per step crossing each link class in the data-parallel gradient reduction and
    parameter gathering (DP and EDP; per layer with FSDP), counted as rings (``comm.ring_bytes``)."""


class SolverInfo(Spec):
    """How the plan was found."""

    status: str
    """Solver status in words (``optimal``, ``time limit``, ``exhaustive``)."""
    optimal: bool
    """True only when optimality within the gap was proven."""
    gap: NonNegativeFloat | None = None
    """Relative MIP gap at the end, when the solver reports one."""
    solve_time_s: NonNegativeFloat
    """Wall time of the solve, seconds (not part of byte-identical comparisons)."""
    candidates: NonNegativeInt = 0
    """Candidate layouts considered."""
    memory_margin_bytes: NonNegativeFloat = 0.0
    """Memory kept free on every GPU: the search held each rank's peak to HBM less this
    (``--memory-margin``; ``planner.schema.margin``). 0 in plans written before the option existed."""


class PlanProvenance(Spec):
    """What produced the plan. No timestamps: identical inputs give byte-identical plans."""

    moeplan_version: str
    """Version of moeplan that wrote the plan."""
    model_source: str | None = None
    """The model's source line."""
    cluster_source: str | None = None
    """The cluster profile's provenance (publication or probe run)."""


class ModelRef(Spec):
    """Which model a plan is for, so that the plan alone can load it again."""

    name: str
    """The model's name (a catalog name, or the ``name`` of a model file)."""
    source: Literal["catalog", "file", "derived"]
    """``catalog``: a bundled model, loaded by name; ``file``: a model YAML or config.json; ``derived``:
    defined inside another document (a validation file) and kept nowhere on its own."""
    path: str | None = None
    """The file as it was given to ``moeplan solve`` (relative paths: to the directory solve ran in, or
    to the plan file's folder). Rule: given exactly for ``file``."""
    sha256: str | None = None
    """SHA-256 of the file's bytes when the plan was made; loading refuses a file that changed since.
    Rule: given exactly for ``file``."""

    @model_validator(mode="after")
    def _file_has_path_and_hash(self) -> ModelRef:
        _check_file_fields(self.source == "file", self.path, self.sha256, self.source)
        return self


class ClusterRef(Spec):
    """Which cluster profile a plan was priced on, so that the plan alone can load it again."""

    name: str
    """The profile's name (``a800-2x8``, ``probe-host-2x8``)."""
    source: Literal["bundled", "file", "probe", "derived"]
    """``bundled``: shipped with moeplan, loaded by name and resized to the plan's ``num_nodes``;
    ``file``: a profile file; ``probe``: a profile ``moeplan probe`` measured, kept in the moeplan home
    under its content hash; ``derived``: figures changed by ``--what-if`` or built from a validation
    file, kept nowhere (the plan cannot be priced again from itself)."""
    path: str | None = None
    """``file``: the file as given to ``moeplan solve`` (relative paths: to the directory solve ran in, or
    to the plan file's folder); ``probe``: the stored copy. Rule: given exactly for ``file`` and ``probe``."""
    sha256: str | None = None
    """SHA-256 of the file's bytes when the plan was made; loading refuses a file that changed since.
    Rule: given exactly for ``file`` and ``probe``."""

    @model_validator(mode="after")
    def _file_has_path_and_hash(self) -> ClusterRef:
        _check_file_fields(self.source in ("file", "probe"), self.path, self.sha256, self.source)
        return self


def _check_file_fields(is_file: bool, path: str | None, sha256: str | None, source: str) -> None:
    if is_file and (path is None or sha256 is None):
        raise ValueError(f"source '{source}' needs both path and sha256")
    if not is_file and (path is not None or sha256 is not None):
        raise ValueError(f"path and sha256 are only given for a file, not for source '{source}'")


class Plan(Spec):
    """A complete, versioned plan: inputs named, layout chosen, prediction and solver report attached.

    It carries everything needed to price, emit and run it again: where the model and the profile came
    from, and the node shape (``moeplan emit --format torchrun`` and ``slurm`` read it from here).
    """

    schema_version: Literal[3] = PLAN_SCHEMA_VERSION
    """Plan document version."""
    model: ModelRef
    """The model, and where it came from."""
    cluster: ClusterRef
    """The cluster profile the plan was priced on, and where it came from."""
    num_nodes: PositiveInt
    """Nodes the plan runs on (``--nnodes``, Slurm ``--nodes``)."""
    num_gpus_per_node: PositiveInt
    """GPUs per node (``--nproc-per-node``, Slurm ``--gpus-per-node``)."""
    num_gpus: PositiveInt
    """World size the plan is for. Rule: num_nodes x num_gpus_per_node."""
    training: TrainingSpec
    """Sequence length, global batch, precision, routing."""
    parallel: ParallelConfig
    """Degrees and per-step choices."""
    estimate: Estimate | None = None
    """The cost model's prediction, when computed."""
    solver: SolverInfo | None = None
    """Solver report, when the plan came from ``moeplan solve``."""
    provenance: PlanProvenance
    """What produced the plan."""

    @model_validator(mode="after")
    def _world_is_the_node_shape(self) -> Plan:
        if self.num_nodes * self.num_gpus_per_node != self.num_gpus:
            raise ValueError(
                f"num_gpus ({self.num_gpus}) must equal num_nodes x num_gpus_per_node "
                f"({self.num_nodes} x {self.num_gpus_per_node})"
            )
        return self
