"""Published-measurement files (format ``moeplan-validation/1``) and the statistics that score predictions.

``load_validation_file`` reads a file of the format described in ``../shared/validation/README.md``
into a ``ValidationSuite``; ``case_inputs`` turns one case into the planner's own objects (ModelSpec,
TrainingSpec, ParallelConfig, ClusterProfile), filling the fields a source left null with the settings
such published runs commonly use. The cluster of a case is built from its nominal line rates by
``cluster_from_nominal``, with published bus-bandwidth efficiencies and latencies:

- NVLink/NVSwitch ring-type collectives reach ~370 GB/s busbw of H100's 450 GB/s line rate (0.82), and
  NVLS all_reduce peaks at ~480 (480/450) (sjeaugey, https://github.com/NVIDIA/nccl-tests/issues/212);
- a 400 Gb/s NIC reaches 46-49 GB/s busbw for all kinds, 48 of 50 taken (0.96)
  (https://github.com/NVIDIA/nccl-tests/issues/290);
- latency 10 us in a node (10.14 us, 2-GPU A100 all_reduce at 32 B, https://github.com/NVIDIA/nccl/issues/583)
  and 47 us across nodes (46-47 us on 2 x 8 GPUs, https://github.com/NVIDIA/nccl/issues/1244).

The scoring helpers (Kendall's tau-b, best-configuration match, signed error, MAPE) are pure Python.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from planner.costmodel.dispatchers import spec_for
from planner.errors import SpecError
from planner.feasibility import check_plan
from planner.schema import (
    COLLECTIVE_KINDS,
    RECOMPUTE_MODULES,
    AlphaBetaFit,
    ClusterProfile,
    CudaGraphScope,
    DispatcherSpec,
    GpuSpec,
    LinkClass,
    ModelSpec,
    ParallelConfig,
    Precision,
    Provenance,
    RoutingMode,
    TrainingSpec,
)
from planner.schema._base import Spec
from planner.schema.ranges import MAX_WORLD_SIZE, Bandwidth, GpusPerNode
from planner.specfiles import read_mapping, suggest, validate_spec

__all__ = [
    "FORMAT",
    "INTER_NODE_LATENCY_US",
    "INTRA_NODE_LATENCY_US",
    "NIC_BUSBW_EFFICIENCY",
    "NVLINK_BUSBW_EFFICIENCY",
    "NVLS_ALL_REDUCE_EFFICIENCY",
    "CaseInputs",
    "Measured",
    "Metric",
    "ValidationCase",
    "ValidationCluster",
    "ValidationParallel",
    "ValidationSuite",
    "ValidationTraining",
    "best_indices",
    "case_inputs",
    "cluster_from_nominal",
    "kendall_tau",
    "load_validation_file",
    "mape",
    "pairwise_agreement",
    "signed_error",
    "top1_match",
]

FORMAT = "moeplan-validation/1"
CASE_RULE_FIELDS = frozenset(
    {"tp*cp*pp*dp", "etp*ep*pp*edp", "tp", "ep", "cp", "global_batch", "seq_len", "tp_comm_overlap",
     "delay_wgrad_compute"}
)  # fmt: skip
"""The rules (``planner.feasibility`` fields) a measured case must meet, since it ran: the grids tile its GPUs,
TP divides the heads and query groups, EP the experts, the sequence splits over TP (with SP) and 2 x CP, the
global batch over DP x micro-batch, a stated TP overlap has sequence parallelism (and no MLA, where Megatron
would have run without it), stated delayed weight gradients have EP overlap. A case that breaks one is refused (exit 2, naming the case). Megatron-LM's
own scheduling rules (the layer split, the EP overlap's pipeline needs) are not applied: a published run may
split layers unevenly, or run another framework."""
Metric = Literal["model_tflops_per_gpu", "step_time_s", "tokens_per_s_per_gpu", "mfu"]

NVLINK_BUSBW_EFFICIENCY = 0.82
"""busbw / line rate of NVLink ring-type collectives: ~370 of 450 GB/s on H100 (nccl-tests#212)."""
NVLS_ALL_REDUCE_EFFICIENCY = 480 / 450
"""busbw / line rate of NVLink all_reduce with NVLS (in-switch reduction): ~480 of 450 GB/s (nccl-tests#212)."""
NVLS_CAPABILITY = (9, 0)
"""NVLink SHARP needs third-generation NVSwitch, i.e. Hopper systems and later (NCCL's NVLS algorithm,
transport/nvls.cc, runs on sm_90 and up); an A100's all_reduce is a ring: 231 GB/s busbw on 8 A100s at 8 GB
(Azure/AI-benchmarking-guide ND_A100_v4_results.md), 0.77 of its 300 GB/s, where the ring figure gives 0.82."""
NIC_BUSBW_EFFICIENCY = 0.96
"""busbw / line rate over the NIC, all kinds: 46-49 GB/s per 400 Gb/s NIC, 48 of 50 taken (nccl-tests#290)."""
INTRA_NODE_LATENCY_US = 10.0
"""Small-message latency in a node: 10.14 us for a 2-GPU A100 all_reduce at 32 B (NVIDIA/nccl#583)."""
INTER_NODE_LATENCY_US = 47.0
"""Small-message latency across nodes: 46-47 us on 2 x 8 GPUs (NVIDIA/nccl#1244)."""

_TIE_REL_TOL = 1e-9
_T = TypeVar("_T")


class ValidationCluster(Spec):
    """A cluster by its nominal figures, as the validation format states it."""

    gpu: str
    """Key of the ``gpus`` entry."""
    gpus_per_node: GpusPerNode
    """GPUs sharing the scale-up domain (NVLink/NVSwitch; 72 for an NVL72 rack)."""
    intra_node_gbps: Bandwidth
    """Nominal scale-up bandwidth per GPU per direction, GB/s."""
    inter_node_gbps: Bandwidth
    """Nominal scale-out (NIC) bandwidth per GPU per direction, GB/s."""
    source: str
    """Where the figures come from."""


class ValidationTraining(Spec):
    """Training settings of a case; null means not stated by the source."""

    seq_len: PositiveInt
    global_batch: PositiveInt
    micro_batch: PositiveInt | None = None
    precision: Precision
    routing: RoutingMode | None = None
    capacity_factor: PositiveFloat | None = None


class ValidationParallel(Spec):
    """Parallel layout of a case; null means not stated by the source."""

    tp: PositiveInt | None = None
    pp: PositiveInt | None = None
    vpp: PositiveInt | None = None
    cp: PositiveInt | None = None
    ep: PositiveInt | None = None
    etp: PositiveInt | None = None
    sequence_parallel: bool | None = None
    recompute: Literal["none", "selective", "full"] | None = None
    recompute_modules: tuple[str, ...] | None = None
    """Megatron's ``--recompute-modules`` names. Rule: each is one moeplan prices."""
    dispatcher: Literal["allgather", "alltoall", "deepep", "hybridep"] | None = None
    dispatcher_num_sms: PositiveInt | None = None
    """SMs of the DeepEP or Hybrid-EP kernels (Megatron's ``--moe-deepep-num-sms`` / ``--moe-hybridep-num-sms``;
    optional; null: Megatron-Core 0.16's defaults). Rule: only with ``deepep`` or ``hybridep``."""
    a2a_overlap: bool | None = None
    delay_wgrad_compute: bool | None = None
    """Megatron's ``--delay-wgrad-compute`` (optional; null: off, Megatron-LM's default). Rule: only with
    ``a2a_overlap``."""
    moe_router_fusion: bool | None = None
    """Megatron-Core's ``--moe-router-fusion`` (optional; null: on, as NVIDIA's performance recipes run it:
    Megatron-Bridge's perf_recipes, Megatron-LM's MoE guide "Enable kernel fusions")."""
    tp_comm_overlap: bool | None = None
    """Megatron's ``--tp-comm-overlap`` (optional; null: off, Megatron-LM's default)."""
    overlap_grad_reduce: bool | None = None
    """Megatron's ``--overlap-grad-reduce`` (optional; null: on, as published Megatron-Bridge and Megatron-LM
    performance recipes run)."""
    distributed_optimizer: bool | None = None
    fsdp: bool | None = None
    main_grads_dtype: Literal["fp32", "bf16"] | None = None
    """Optional (moeplan's addition): the gradient buffer's dtype. Null: Megatron-LM's default, fp32."""
    use_precision_aware_optimizer: bool | None = None
    """Optional (moeplan's addition): ``--use-precision-aware-optimizer``. Null: off (Megatron-LM's default)."""
    exp_avg_dtype: Literal["fp32", "bf16"] | None = None
    """Optional (moeplan's addition): Adam's first moment. Null: fp32. Rule: bf16 needs the precision-aware
    optimizer."""
    exp_avg_sq_dtype: Literal["fp32", "bf16"] | None = None
    """Optional (moeplan's addition): Adam's second moment. Rule: the same dtype as ``exp_avg_dtype``
    (moeplan prices one dtype for both)."""
    attention_backend: Literal["auto", "flash", "fused", "unfused", "local"] | None = None
    """Optional (moeplan's addition): Megatron-LM's ``--attention-backend``. Null: auto (fused). ``unfused``
    and ``local`` keep the score matrix (moeplan's ``unfused``); the others do not."""
    fp8_param_gather: bool | None = None
    """Optional (moeplan's addition): ``--fp8-param-gather`` (NeMo's ``fp8_params``, Megatron-Bridge's
    ``mixed_precision.fp8_param_gather``): FP8 training keeps its GEMM weights in FP8. Null: off
    (Megatron-LM's default), where Transformer Engine caches an FP8 copy of each BF16 weight. Rule: true
    needs FP8 or MXFP8 training and the distributed optimizer or FSDP."""
    cuda_graphs: tuple[CudaGraphScope, ...] | None = None
    """Optional (moeplan's addition): what CUDA graphs captured, as Megatron-Core's ``--cuda-graph-scope``
    (or ``--cuda-graph-modules``) names: ``attn``, ``mlp``, ``moe_router``, ``moe_preprocess`` (Transformer
    Engine's per-layer graphs) or ``full_iteration``; ``[]``: none. Null: none, Megatron-LM's default
    (``--cuda-graph-impl none``)."""
    store_param_remainders: bool | None = None
    """Optional (moeplan's addition): whether the precision-aware optimizer kept BF16 runs' master weights
    as 16-bit remainders (Megatron-Core's ``store_param_remainders``; ``OptimizerConfig.param_remainders``).
    Null: yes, Megatron-LM's behaviour. False for a run whose Megatron-Core kept a full FP32 master, as
    Megatron-Bridge's recipes do (their mixed-precision config names an FP8 recipe even without FP8).
    Rule: false needs the precision-aware optimizer."""

    @model_validator(mode="after")
    def _one_moment_dtype(self) -> ValidationParallel:
        if (self.exp_avg_dtype or "fp32") != (self.exp_avg_sq_dtype or "fp32"):
            raise ValueError(
                f"exp_avg_dtype ({self.exp_avg_dtype}) and exp_avg_sq_dtype ({self.exp_avg_sq_dtype}) differ; "
                "moeplan prices one dtype for both moments"
            )
        return self

    @property
    def unstated_model_state(self) -> bool:
        """The source leaves the gradient or optimizer precision open (any of its fields null)."""
        return None in (self.main_grads_dtype, self.use_precision_aware_optimizer, self.exp_avg_dtype)

    @field_validator("recompute_modules")
    @classmethod
    def _known_modules(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for module in value or ():
            if module not in RECOMPUTE_MODULES:
                raise ValueError(f"unknown module '{module}'; known: {', '.join(RECOMPUTE_MODULES)}")
        return value


class Measured(Spec):
    """The published result: a value of one metric, or an outcome such as ``oom``."""

    metric: Metric
    value: PositiveFloat | None = None
    outcome: str | None = None
    """What happened when there is no value (``oom``). Rule: given when value is null."""
    peak_memory_gib: PositiveFloat | None = None
    """Peak device memory per GPU the run reported, GiB (2^30 bytes; a figure published in GB is divided
    by 1.0737), when the source states one: PyTorch's ``max_memory_allocated``, which Megatron-LM and
    Megatron-Bridge print. ``moeplan validate`` scores the predicted peak less the reserve against it."""
    peak_memory_rank: Literal["last"] | None = None
    """Optional (moeplan's addition): the pipeline rank whose peak the source reports. ``last``: the last
    stage (Megatron-LM writes its memory metrics on the last rank only, ``global_vars.py``); null: the
    busiest rank."""

    @model_validator(mode="after")
    def _value_or_outcome(self) -> Measured:
        if self.value is None and self.outcome is None:
            raise ValueError("value is null, so outcome must be given (e.g. oom)")
        return self


class ValidationCase(Spec):
    """One published run: where, what, how it was split, and what was measured."""

    id: str
    group: str
    """Cases of one group are ranked against each other."""
    source: str
    cluster: str
    """Key of the ``clusters`` entry."""
    num_gpus: Annotated[int, Field(gt=0, le=MAX_WORLD_SIZE)]
    model: str
    """Key of the ``models`` entry."""
    training: ValidationTraining
    parallel: ValidationParallel = Field(default_factory=ValidationParallel)
    measured: Measured
    notes: str | None = None

    @model_validator(mode="after")
    def _fp8_param_gather_needs_fp8(self) -> ValidationCase:
        p, precision = self.parallel, self.training.precision
        if p.fp8_param_gather and precision not in ("fp8", "mxfp8"):
            raise ValueError(f"parallel.fp8_param_gather is true, so training.precision must be fp8 or mxfp8, "
                             f"not {precision}")  # fmt: skip
        if p.fp8_param_gather and p.distributed_optimizer is False and not p.fsdp:
            raise ValueError(
                "parallel.fp8_param_gather is true, so the distributed optimizer or FSDP must be on"
            )
        return self


class ValidationSuite(Spec):
    """A whole ``moeplan-validation/1`` file. Rule: every name a case or cluster uses is defined."""

    format: Literal["moeplan-validation/1"]
    gpus: dict[str, GpuSpec]
    """GPU entries; ``name`` is the mapping key when absent."""
    clusters: dict[str, ValidationCluster]
    models: dict[str, ModelSpec]
    """Model entries; ``name`` is the mapping key when absent."""
    cases: tuple[ValidationCase, ...]

    @field_validator("gpus", "models", mode="before")
    @classmethod
    def _name_from_key(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        named: dict[Any, Any] = {}
        for key, entry in value.items():
            if isinstance(entry, dict):
                entry = {"name": key, **entry}
            elif isinstance(entry, GpuSpec | ModelSpec) and entry.name is None:
                entry = entry.model_copy(update={"name": key})
            named[key] = entry
        return named

    @model_validator(mode="after")
    def _references_resolve(self) -> ValidationSuite:
        problems = []
        for name, cluster in self.clusters.items():
            if cluster.gpu not in self.gpus:
                problems.append(_unknown(f"cluster '{name}'", "gpu", cluster.gpu, "gpus", list(self.gpus)))
        seen: set[str] = set()
        for case in self.cases:
            if case.id in seen:
                problems.append(f"case '{case.id}' field `id`: the id is used by an earlier case")
            seen.add(case.id)
            for field, known in (("cluster", self.clusters), ("model", self.models)):
                name = getattr(case, field)
                if name not in known:
                    problems.append(_unknown(f"case '{case.id}'", field, name, f"{field}s", list(known)))
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _unknown(owner: str, field: str, value: str, section: str, known: list[str]) -> str:
    hint = suggest(value, known).rstrip(".")
    return f"{owner} field `{field}` ({value!r}): no such entry in `{section}` ({hint})"


def load_validation_file(path: Path) -> ValidationSuite:
    """Read a ``moeplan-validation/1`` file; any problem is a SpecError naming entry, field, value, rule."""
    data = read_mapping(path, "validation")
    where = f"validation file '{path}'"
    if data.get("format", FORMAT) != FORMAT:
        raise SpecError(f"{where} is invalid: field `format` ({data['format']!r}): must be '{FORMAT}'.")
    parts: dict[str, Any] = {}
    sections: tuple[tuple[str, str, type[Spec]], ...] = (
        ("gpus", "gpu", GpuSpec),
        ("clusters", "cluster", ValidationCluster),
        ("models", "model", ModelSpec),
    )
    for section, what, spec in sections:
        entries = data.get(section)
        if isinstance(entries, dict):
            parts[section] = {
                key: validate_spec(spec, entry, f"{where} {what} '{key}'") for key, entry in entries.items()
            }
    cases = data.get("cases")
    if isinstance(cases, list):
        parts["cases"] = [
            validate_spec(ValidationCase, entry, f"{where} case '{_case_label(entry, index)}'")
            for index, entry in enumerate(cases)
        ]
    return validate_spec(ValidationSuite, {**data, **parts}, where)


def _case_label(entry: Any, index: int) -> str:
    label = entry.get("id") if isinstance(entry, dict) else None
    return str(label) if label is not None else f"#{index + 1}"


@dataclass(frozen=True)
class CaseInputs:
    """One case in the planner's own terms, ready for the cost model."""

    model: ModelSpec
    training: TrainingSpec
    parallel: ParallelConfig
    cluster: ClusterProfile
    num_gpus: int


def case_inputs(suite: ValidationSuite, case: ValidationCase, lightest: bool = False) -> CaseInputs:
    """Convert one case, filling null fields with the settings such published runs commonly use.

    Null means: micro-batch, cp and vpp 1; etp as Megatron-LM's default, tp (1 for a dense model, or where
    tp x ep would not divide the ranks of a stage, a layout Megatron refuses, so not what a run used); routing ``dropless`` (Megatron's default); sequence
    parallelism when tp > 1; no recompute (``selective`` when only modules are named); the ``alltoall``
    dispatcher (DeepEP and Hybrid-EP on Megatron-Core 0.16's SMs); router fusion; no EP overlap; no TP
    overlap; the data-parallel overlap (``--overlap-grad-reduce``) on; the distributed optimizer; no FSDP;
    Megatron-LM's FP32 gradients and Adam state. ``deepep`` and ``hybridep`` become the hierarchical
    dispatcher with that backend; a dense model always gets ``alltoall``.

    ``lightest``: the model-state settings the case leaves null take instead the lightest Megatron offers
    without offload (BF16 gradients, the precision-aware optimizer with BF16 moments, as Megatron-Bridge's
    DeepSeek-V3 and Moonlight recipes use; FP8 parameters under FP8 training, as its FP8 recipes but the
    blockwise one set): the format asks to treat a null as
    uncertain, so a run that ran is called out of memory only if it fits under neither.
    """
    where = f"case '{case.id}'"
    model = _lookup(suite.models, case.model, where, "model")
    cluster = _lookup(suite.clusters, case.cluster, where, "cluster")
    gpu = _lookup(suite.gpus, cluster.gpu, f"cluster '{case.cluster}'", "gpu")
    t, p = case.training, case.parallel
    fields = t.model_dump(exclude={"micro_batch"}) | {"routing": t.routing or "dropless"}
    training = validate_spec(TrainingSpec, fields, f"{where} training")
    dispatcher = spec_for(p.dispatcher) if model.is_moe and p.dispatcher is not None else DispatcherSpec()
    if p.dispatcher_num_sms is not None:
        if dispatcher.kind != "hierarchical":
            raise SpecError(
                f"{where}: dispatcher_num_sms ({p.dispatcher_num_sms}) is only used by deepep or hybridep, "
                f"not {p.dispatcher or 'the default alltoall'}."
            )
        dispatcher = dispatcher.model_copy(update={"num_sms": p.dispatcher_num_sms})
    tp = p.tp or 1
    modules = p.recompute_modules or ()
    degrees: dict[str, object] = {
        "tp": tp,
        "pp": p.pp or 1,
        "vpp": p.vpp or 1,
        "cp": p.cp or 1,
        "ep": p.ep or 1,
        "etp": p.etp or _default_etp(model, case.num_gpus, tp, p.pp or 1, p.ep or 1),
        "micro_batch": t.micro_batch or 1,
        "sequence_parallel": tp > 1 if p.sequence_parallel is None else p.sequence_parallel,
        "recompute": p.recompute or ("selective" if modules else "none"),
        "recompute_modules": modules,
        "distributed_optimizer": True if p.distributed_optimizer is None else p.distributed_optimizer,
        "fsdp": bool(p.fsdp),
        "a2a_overlap": bool(p.a2a_overlap),
        "delay_wgrad_compute": bool(p.delay_wgrad_compute),
        "overlap_grad_reduce": True if p.overlap_grad_reduce is None else p.overlap_grad_reduce,
        "tp_comm_overlap": bool(p.tp_comm_overlap),
        "moe_router_fusion": p.moe_router_fusion is not False,
        "dispatcher": dispatcher,
        "optimizer": _optimizer(p, lightest),
        "attention_backend": "unfused" if p.attention_backend in ("unfused", "local") else "fused",
        "fp8_param_gather": _fp8_param_gather(p, t.precision, lightest),
        "cuda_graphs": p.cuda_graphs or (),
    }
    validate_spec(ParallelConfig, degrees, f"{where} parallel")
    parallel = ParallelConfig.for_world(case.num_gpus, **degrees)
    broken = [
        str(v) for v in check_plan(model, training, parallel, case.num_gpus) if v.field in CASE_RULE_FIELDS
    ]
    if broken:
        raise SpecError(f"{where} cannot have run as stated: {'; '.join(broken)}.")
    nominal = cluster.model_dump(exclude={"gpu"})
    profile = cluster_from_nominal(case.cluster, gpu, num_gpus=case.num_gpus, **nominal)
    return CaseInputs(
        model=model, training=training, parallel=parallel, cluster=profile, num_gpus=case.num_gpus
    )


def _default_etp(model: ModelSpec, num_gpus: int, tp: int, pp: int, ep: int) -> int:
    """Megatron-LM's ``--expert-tensor-parallel-size`` when not given: the TP degree (arguments.py), if the
    expert grid etp x ep x pp divides the GPUs; else 1."""
    if not model.is_moe or num_gpus % (tp * ep * pp):
        return 1
    return tp


def _optimizer(p: ValidationParallel, lightest: bool) -> dict[str, object]:
    """The case's model-state settings (``OptimizerConfig`` fields): stated, else default or lightest."""
    grads = p.main_grads_dtype or ("bf16" if lightest else "fp32")
    aware = p.use_precision_aware_optimizer
    aware = (lightest or p.exp_avg_dtype == "bf16") if aware is None else aware
    moments = p.exp_avg_dtype or ("bf16" if lightest and aware else "fp32")
    remainders = True if p.store_param_remainders is None else p.store_param_remainders
    return {
        "main_grads_dtype": grads, "precision_aware": aware, "exp_avg_dtype": moments,
        "param_remainders": remainders,
    }  # fmt: skip


def _fp8_param_gather(p: ValidationParallel, precision: str, lightest: bool) -> bool:
    """Stated, else off, or under ``lightest`` on wherever Megatron allows it (FP8 training with the
    distributed optimizer or FSDP, as Megatron-Bridge's FP8 recipes but the blockwise one set it)."""
    if p.fp8_param_gather is not None:
        return p.fp8_param_gather
    sharded = p.fsdp or p.distributed_optimizer is not False
    return lightest and precision in ("fp8", "mxfp8") and sharded


def _lookup(entries: dict[str, _T], key: str, owner: str, field: str) -> _T:
    if key not in entries:
        hint = suggest(key, list(entries)).rstrip(".")
        raise SpecError(f"{owner} field `{field}` ({key!r}): no such entry ({hint}).")
    return entries[key]


def cluster_from_nominal(
    name: str,
    gpu: GpuSpec,
    gpus_per_node: int,
    num_gpus: int,
    intra_node_gbps: float,
    inter_node_gbps: float,
    source: str,
) -> ClusterProfile:
    """A ClusterProfile of ``num_gpus`` GPUs from nominal line rates and the published efficiencies.

    The scale-up domain ("node") is ``gpus_per_node`` GPUs; when that does not divide ``num_gpus``
    (256 GB200 in 72-GPU NVL72 racks) it is the largest divisor of ``num_gpus`` not above
    ``gpus_per_node`` (4 domains of 64), and the description says so. Fewer GPUs than a node: one node.
    """
    if num_gpus <= gpus_per_node:
        per_node = num_gpus
    else:
        per_node = next(d for d in range(gpus_per_node, 0, -1) if num_gpus % d == 0)
    num_nodes = num_gpus // per_node
    description = (
        f"{num_nodes} x {per_node} {gpu.name or 'GPU'} from nominal figures: "
        f"{intra_node_gbps:g} GB/s scale-up, {inter_node_gbps:g} GB/s per GPU between domains"
    )
    if num_gpus > gpus_per_node and per_node != gpus_per_node:
        description += (
            f"; {num_gpus} GPUs do not fill whole {gpus_per_node}-GPU domains, so modelled as "
            f"{num_nodes} domains of {per_node}"
        )

    def fit(latency_us: float, busbw: float, rule: str) -> AlphaBetaFit:
        return AlphaBetaFit(latency_us=latency_us, bandwidth_gbps=busbw, source=rule)

    ring = fit(
        INTRA_NODE_LATENCY_US,
        NVLINK_BUSBW_EFFICIENCY * intra_node_gbps,
        "0.82 x nominal (~370 of 450 GB/s, NVIDIA/nccl-tests#212); latency 10 us (NVIDIA/nccl#583)",
    )
    nvls = fit(
        INTRA_NODE_LATENCY_US,
        NVLS_ALL_REDUCE_EFFICIENCY * intra_node_gbps,
        "480/450 x nominal (NVLS all_reduce, NVIDIA/nccl-tests#212); latency 10 us (NVIDIA/nccl#583)",
    )
    nic = fit(
        INTER_NODE_LATENCY_US,
        NIC_BUSBW_EFFICIENCY * inter_node_gbps,
        "0.96 x nominal (48 of 50 GB/s, NVIDIA/nccl-tests#290); latency 47 us (NVIDIA/nccl#1244)",
    )
    has_nvls = (
        gpu.capability is None or gpu.capability >= NVLS_CAPABILITY
    )  # unknown: as nccl-tests#212's H100
    links = {
        "intra_node": LinkClass(
            medium="scale-up domain (NVLink/NVSwitch), nominal",
            nominal_gbps=intra_node_gbps,
            collectives={
                kind: nvls if kind == "all_reduce" and has_nvls else ring for kind in COLLECTIVE_KINDS
            },
            source=source,
        ),
        "inter_node": LinkClass(
            medium="scale-out NIC, nominal",
            nominal_gbps=inter_node_gbps,
            collectives=dict.fromkeys(COLLECTIVE_KINDS, nic),
            source=source,
        ),
    }
    return ClusterProfile(
        name=name,
        description=description,
        num_nodes=num_nodes,
        num_gpus_per_node=per_node,
        gpu=gpu,
        links=links,
        provenance=Provenance(kind="published", source=source),
    )


def kendall_tau(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Kendall's tau-b rank correlation, ties handled.

    Over all pairs i < j: C concordant (x and y order the pair alike), D discordant, T_x pairs tied in
    x, T_y pairs tied in y (a pair tied in both counts in both), n0 = n(n-1)/2:

        tau_b = (C - D) / sqrt((n0 - T_x) * (n0 - T_y))

    Returns NaN when it is undefined: fewer than two items, or every x (or every y) equal.
    """
    if len(xs) != len(ys):
        raise ValueError(f"kendall_tau needs sequences of equal length, not {len(xs)} and {len(ys)}")
    n = len(xs)
    concordant = discordant = tied_x = tied_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = xs[i] - xs[j], ys[i] - ys[j]
            tied_x += dx == 0
            tied_y += dy == 0
            if dx * dy > 0:
                concordant += 1
            elif dx * dy < 0:
                discordant += 1
    n0 = n * (n - 1) // 2
    denominator = math.sqrt((n0 - tied_x) * (n0 - tied_y))
    return (concordant - discordant) / denominator if denominator else math.nan


def pairwise_agreement(predicted: Sequence[float], measured: Sequence[float]) -> tuple[float, int]:
    """(pairs the prediction orders as measured, pairs compared): every pair of cases with different
    measured values, a pair the prediction ties counting half (the concordance index). The metric's
    direction does not matter: both sequences are the same metric."""
    if len(predicted) != len(measured):
        raise ValueError(
            f"pairwise_agreement needs sequences of equal length, not {len(predicted)} and {len(measured)}"
        )
    right, pairs = 0.0, 0
    for i in range(len(measured)):
        for j in range(i + 1, len(measured)):
            dy = measured[i] - measured[j]
            if dy == 0:
                continue
            pairs += 1
            dx = predicted[i] - predicted[j]
            right += 1.0 if dx * dy > 0 else 0.5 if dx == 0 else 0.0
    return right, pairs


def best_indices(values: Sequence[float | None], metric: Metric) -> set[int]:
    """Indices of the best value (lowest step time, else highest throughput), ties kept.

    None and NaN (no value, e.g. out of memory) are never best; values within a relative 1e-9 of the
    best count as tied. Empty when no value is given.
    """
    given = {i: v for i, v in enumerate(values) if v is not None and not math.isnan(v)}
    if not given:
        return set()
    best = min(given.values()) if metric == "step_time_s" else max(given.values())
    return {i for i, v in given.items() if math.isclose(v, best, rel_tol=_TIE_REL_TOL)}


def top1_match(predicted: Sequence[float | None], measured: Sequence[float | None], metric: Metric) -> bool:
    """Whether every predicted-best case is among the measured-best cases: a planner picks any of the cases
    it predicts best, so a predicted tie with a case measured slower is not a match."""
    if len(predicted) != len(measured):
        raise ValueError(
            f"top1_match needs sequences of equal length, not {len(predicted)} and {len(measured)}"
        )
    chosen = best_indices(predicted, metric)
    return bool(chosen) and chosen <= best_indices(measured, metric)


def signed_error(predicted: float, measured: float) -> float:
    """Relative error (predicted - measured) / measured: +0.1 means 10 % over the measurement."""
    if measured == 0:
        raise ValueError("signed_error needs a non-zero measured value")
    return (predicted - measured) / measured


def mape(errors: Sequence[float]) -> float:
    """Mean absolute (percentage) error of relative errors, as a fraction (0.12 = 12 %); NaN when empty."""
    return sum(abs(e) for e in errors) / len(errors) if errors else math.nan
