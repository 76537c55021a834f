"""Rules across objects: whether a ParallelConfig can run a model on a world of GPUs, as Megatron checks it.

Each rule returns Violations (field, value, rule); ``check_plan`` collects them all and
``require_feasible`` turns them into one SpecError paragraph. Used by every command that takes degrees.
Rules and where Megatron-LM enforces them (``../shared/reference/ecosystem.md`` §1.5, main ``d98e8a64``):

1. dense grid: ``tp*cp*pp*dp == world`` (arguments.py:427, parallel_state.py:823);
2. expert grid: ``etp*ep*pp*edp == world`` (parallel_state.py:866); CP is not a factor (parallel folding);
3. ``num_experts % ep == 0``; ep > 1 and etp > 1 need an MoE model (arguments.py:1655, moe_layer.py:186);
   experts with biases (``add_bias_linear``, gpt-oss) need etp 1 (transformer_config.py:1588 at core_v0.16.1);
4. MoE with tp > 1 needs sequence parallelism (moe_layer.py:637) -- Megatron only: DeepSpeed-MoE (and
   MoNTA's baseline) runs TP without SP, so this rule is ``megatron_only`` and ``estimate`` warns instead;
5. layers: ``num_layers % (pp*vpp) == 0`` for an even split, else ``layers_per_stage`` has pp*vpp entries
   summing to num_layers (arguments.py:998);
6. vpp > 1 needs pp > 1 (parallel_state.py:830);
7. ``num_attention_heads % tp == 0``; ``num_query_groups % tp == 0 or tp % num_query_groups == 0``
   (transformer_config.py:1446);
8. ``global_batch % (micro_batch*dp) == 0`` (num_microbatches_calculator.py);
9. sequence: ``seq_len % tp == 0`` with sequence parallelism; ``seq_len % (2*cp) == 0`` with cp > 1
   (causal load balancing splits each sequence into 2*cp chunks);
10. ``--overlap-moe-expert-parallel-comm`` needs ep > 1, dispatcher alltoall or hierarchical (flex), no full
    recompute, ``moe`` not recomputed, vpp > 1 when pp > 1, at most one MTP layer (transformer_config.py:3002);
11. dispatchers: each kind's own rules (``rules`` of its module in ``planner.costmodel.dispatchers``:
    hierarchical and monta need ep > 1; monta deduplicates over TP, so it needs tp > 1); capacity
    routing needs an MoE model;
12. pipeline schedule, with m = global_batch / (micro_batch * dp) micro-batches per step and pp > 1:
    ``m >= pp`` (with fewer, 1F1B leaves every stage idle for most of the step, and moeplan's runtime
    refuses it); with vpp > 1 also ``m % pp == 0``: Megatron-Core's interleaved schedule runs micro-batches
    in groups of ``microbatch_group_size_per_vp_stage`` (default pp), needs ``pp <= group <= m``, and raises
    when the last group is short of pp (core 0.16, ``pipeline_parallel/schedules.py``
    ``forward_backward_pipelining_with_interleaving``). Under these rules the step's bubble is the
    ``(pp-1)`` chunk times ``planner.costmodel.estimate`` prices;
13. the GPU (``GpuSpec.compute_capability``, NVIDIA's CUDA GPUs list; rules unchecked where it is unknown):
    precision ``bf16`` needs 8.0 (Ampere's BF16 tensor cores), ``fp8`` 8.9 (Transformer Engine's
    ``check_fp8_support``: "compute capability 8.9 or higher"), ``mxfp8`` 10.0 (Blackwell; TE's
    ``check_mxfp8_support``), ``fp16`` runs everywhere; a precision also needs the datasheet peak the cost
    model prices it at; ``--moe-grouped-gemm`` needs 8.0 (Megatron-LM ``validate_args``: "Unsupported compute
    capability for GroupedGEMM kernels"), and recomputing ``moe_act`` needs grouped GEMM (Megatron's
    ``--recompute-modules`` help); a dispatcher's kernel library has its own needs (``hardware_rules`` of
    its module: DeepEP and Hybrid-EP need NVLink in the node, DeepEP compute capability 8.0, Hybrid-EP 9.0);
14. ``dp_sharding: fsdp2`` (PyTorch FSDP2, torchtitan's) shards only with ``distributed_optimizer`` or
    ``fsdp`` on, keeps the default optimizer settings and gathers BF16 weights (no ``fp8_param_gather``);
15. CUDA graphs (``cuda_graphs``; Megatron-Core core_v0.16.1 ``TransformerConfig.__post_init__``, lines
    1716-1800 and 1898-1906 of transformer_config.py): ``full_iteration`` is Megatron-Core's ``local``
    implementation and the other scopes Transformer Engine's, so it stands alone; ``moe_preprocess`` needs
    ``moe_router`` ("only supported with moe_router cuda graph"); ``moe_router`` needs an MoE model and
    ``mlp`` dense layers ("only supported for MoE", "only supported for dense layers"); ``moe_preprocess``
    cannot capture the all-to-all dispatcher's preprocessing under capacity routing ("DtoH copies and
    synchronizations in the preprocess step"); full recompute needs ``full_iteration``; recomputing ``moe``
    excludes ``moe_router``; the EP all-to-all overlap takes Transformer Engine's graphs without ``mlp``.
    moeplan adds one: a ``full_iteration`` graph must capture MoE layers whose shapes do not move (core 0.16
    asks ``--moe-pad-experts-for-cuda-graph-inference``, an inference padding, of ``local`` graphs with EP,
    arguments.py:1158; Bridge's full-iteration MoE recipes run 0.18's paged stash with
    ``moe_expert_rank_capacity_factor``), so in a plan it needs a dense model. Validation files may state it.
16. ``overlap_grad_reduce`` off needs Megatron's data parallelism (its buffers or Megatron-FSDP), not
    ``dp_sharding: fsdp2``: PyTorch FSDP2, as torchtitan runs it, prefetches and reduces each layer
    asynchronously and has no setting to stop it.
17. ``tp_comm_overlap`` (``--tp-comm-overlap``) needs sequence parallelism ("Tensor parallel
    communication/GEMM overlap can happen only when sequence parallelism is enabled", arguments.py:1442),
    so tp above 1 (Megatron turns sequence parallelism off at tp 1, arguments.py:1434), and a model without
    MLA: Transformer Engine's userbuffers serve the linears named qkv, proj, fc1 and fc2 only, and
    Megatron-Core turns the overlap off for the whole configuration when an MLA projection asks for
    another name (extensions/transformer_engine.py:1176).
18. ``delay_wgrad_compute`` (``--delay-wgrad-compute``) needs ``a2a_overlap`` ("overlap_moe_expert_parallel_comm
    must be enabled when enabling delay_wgrad_compute", TransformerConfig.__post_init__ at d98e8a64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from planner.costmodel.dispatchers import dispatcher, kinds
from planner.errors import SpecError
from planner.schema import GpuSpec, ModelSpec, ParallelConfig, TrainingSpec

__all__ = [
    "PRECISION_CAPABILITY",
    "Violation",
    "check_grid",
    "check_plan",
    "choice_rules",
    "cuda_graph_rules",
    "degree_rules",
    "grouped_gemm_supported",
    "hardware_rules",
    "num_microbatches",
    "precision_rules",
    "require_feasible",
    "with_gpu_precision",
]

PRECISION_CAPABILITY: dict[str, tuple[int, int]] = {
    "fp16": (7, 0),
    "bf16": (8, 0),
    "fp8": (8, 9),
    "mxfp8": (10, 0),
}
"""The least compute capability each training precision runs on (sources in rule 13 above)."""
GROUPED_GEMM_CAPABILITY = (8, 0)
"""Megatron-LM's ``validate_args``: ``--moe-grouped-gemm`` asserts compute capability 8 or more."""


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken rule: the field it is about, its value, and the rule in words."""

    field: str
    value: Any
    rule: str
    megatron_only: bool = False
    """Megatron-LM rejects it; other frameworks (DeepSpeed-MoE) run it."""

    def __str__(self) -> str:
        return f"{self.field} ({self.value}) {self.rule}"


def check_grid(p: ParallelConfig, world: int) -> list[Violation]:
    """The dense and expert grids must each tile the world (rules 1 and 2)."""
    out = []
    dense = p.tp * p.cp * p.pp * p.dp
    if dense != world:
        out.append(Violation("tp*cp*pp*dp", dense, f"must equal the world size ({world})"))
    expert = p.etp * p.ep * p.pp * p.edp
    if expert != world:
        out.append(Violation("etp*ep*pp*edp", expert, f"must equal the world size ({world})"))
    return out


def _model_rules(model: ModelSpec, p: ParallelConfig) -> list[Violation]:
    out = []
    if model.num_experts is None:
        if p.ep > 1:
            out.append(Violation("ep", p.ep, f"must be 1: model '{model.name}' has no experts"))
        if p.etp > 1:
            out.append(Violation("etp", p.etp, f"must be 1: model '{model.name}' has no experts"))
    elif model.num_experts % p.ep:
        out.append(Violation("ep", p.ep, f"must divide num_experts ({model.num_experts})"))
    if model.is_moe and p.tp > 1 and not p.sequence_parallel:
        out.append(
            Violation(
                "sequence_parallel", False, "must be on for an MoE model with tp above 1 in Megatron-LM", True
            )
        )
    if model.is_moe and model.add_bias_linear and p.etp > 1:
        # transformer_config.py:1588 at core_v0.16.1: "Bias in Moe is only supported when ETP==1".
        out.append(
            Violation("etp", p.etp, "must be 1: Megatron-LM splits no expert bias (add_bias_linear)", True)
        )
    if "moe_act" in p.effective_recompute_modules and not p.grouped_gemm:
        out.append(
            Violation(
                "recompute_modules",
                "moe_act",
                "needs grouped_gemm (Megatron recomputes the grouped GEMM's activation)",
            )
        )
    if model.num_attention_heads % p.tp:
        out.append(Violation("tp", p.tp, f"must divide num_attention_heads ({model.num_attention_heads})"))
    groups = model.query_groups
    if groups % p.tp and p.tp % groups:
        out.append(Violation("tp", p.tp, f"must divide or be a multiple of num_query_groups ({groups})"))
    return out


def _layer_rules(model: ModelSpec, p: ParallelConfig) -> list[Violation]:
    out = []
    if p.vpp > 1 and p.pp == 1:
        out.append(Violation("vpp", p.vpp, "needs pp above 1"))
    stages = p.pp * p.vpp
    if p.layers_per_stage is None:
        if model.num_layers % stages:
            out.append(
                Violation(
                    "pp*vpp",
                    stages,
                    f"must divide num_layers ({model.num_layers}) unless layers_per_stage is given",
                )
            )
    else:
        if len(p.layers_per_stage) != stages:
            out.append(
                Violation(
                    "layers_per_stage", list(p.layers_per_stage), f"must have pp*vpp = {stages} entries"
                )
            )
        if sum(p.layers_per_stage) != model.num_layers:
            out.append(
                Violation(
                    "layers_per_stage",
                    list(p.layers_per_stage),
                    f"must sum to num_layers ({model.num_layers})",
                )
            )
    return out


def _batch_rules(training: TrainingSpec, p: ParallelConfig, model: ModelSpec) -> list[Violation]:
    out = []
    if training.global_batch % (p.micro_batch * p.dp):
        out.append(
            Violation(
                "global_batch",
                training.global_batch,
                f"must be divisible by micro_batch x dp ({p.micro_batch} x {p.dp})",
            )
        )
    if p.sequence_parallel and p.tp > 1 and training.seq_len % p.tp:
        out.append(
            Violation(
                "seq_len", training.seq_len, f"must be divisible by tp ({p.tp}) with sequence parallelism"
            )
        )
    if p.cp > 1 and training.seq_len % (2 * p.cp):
        out.append(Violation("seq_len", training.seq_len, f"must be divisible by 2 x cp ({2 * p.cp})"))
    if training.routing == "capacity" and not model.is_moe:
        out.append(
            Violation("routing", training.routing, f"needs an MoE model; '{model.name}' has no experts")
        )
    return out


def _dispatch_rules(model: ModelSpec, p: ParallelConfig) -> list[Violation]:
    kind = dispatcher(p.dispatcher.kind)
    out = [Violation("dispatcher", kind.kind, rule) for rule in kind.rules(model, p)]
    if p.a2a_overlap:
        if p.ep == 1:
            out.append(Violation("a2a_overlap", True, "needs ep above 1"))
        if not kind.overlappable:
            able = " or ".join(k for k in kinds() if dispatcher(k).overlappable)
            out.append(Violation("a2a_overlap", True, f"needs the {able} dispatcher, not {kind.kind}"))
        if p.recompute == "full" or "moe" in p.recompute_modules:
            out.append(
                Violation("a2a_overlap", True, "cannot be combined with full recompute or recomputing 'moe'")
            )
        if p.pp > 1 and p.vpp == 1:
            out.append(Violation("a2a_overlap", True, "needs vpp above 1 when pp is above 1"))
        if model.mtp_num_layers > 1:
            out.append(
                Violation("a2a_overlap", True, f"allows at most 1 MTP layer, not {model.mtp_num_layers}")
            )
    return out


def num_microbatches(training: TrainingSpec, p: ParallelConfig) -> int:
    """Micro-batches each pipeline runs per step (at least 1)."""
    return max(1, training.global_batch // (p.micro_batch * p.dp))


def _pipeline_rules(training: TrainingSpec, p: ParallelConfig) -> list[Violation]:
    """Rule 12: enough micro-batches to fill the pipeline, in whole groups of pp when interleaved."""
    if p.pp == 1:
        return []
    m = num_microbatches(training, p)
    how = f"(global_batch {training.global_batch} / (micro_batch {p.micro_batch} x dp {p.dp}))"
    if m < p.pp:
        return [
            Violation(
                "micro_batches",
                m,
                f"{how} must be at least pp ({p.pp}): with fewer, every pipeline stage idles most of the "
                "step; raise the global batch, or lower micro_batch, dp or pp",
            )
        ]
    if p.vpp > 1 and m % p.pp:
        return [
            Violation(
                "micro_batches",
                m,
                f"{how} must be a multiple of pp ({p.pp}) with vpp {p.vpp}: Megatron-Core's interleaved "
                "schedule runs micro-batches in groups of pp and raises on a short last group; change the "
                "global batch, or use vpp 1",
            )
        ]
    return []


def _capability(gpu: GpuSpec) -> str:
    return f"GPU {gpu.name or '(unnamed)'} has compute capability {gpu.compute_capability}"


def _priced(precision: str, gpu: GpuSpec) -> bool:
    """The datasheet gives the peak the cost model prices this precision at (fp16 may use the BF16 one)."""
    peaks = gpu.peak_tflops
    if precision == "fp16":
        return peaks.fp16 is not None or peaks.bf16 is not None
    return getattr(peaks, "fp8" if precision.endswith("fp8") else precision) is not None


def precision_rules(training: TrainingSpec, gpu: GpuSpec) -> list[Violation]:
    """Rule 13 for the precision: the GPU runs it, and its datasheet gives the peak it is priced at."""
    precision, have = training.precision, gpu.capability
    need = PRECISION_CAPABILITY[precision]
    runs = [
        p for p, least in PRECISION_CAPABILITY.items() if (have is None or have >= least) and _priced(p, gpu)
    ]
    instead = f"use --precision {' or '.join(runs)}" if runs else "use another GPU"
    if have is not None and have < need:
        rule = f"needs compute capability {need[0]}.{need[1]} or more ({_capability(gpu)}); {instead}"
        return [Violation("precision", precision, rule)]
    if have is None and precision == "mxfp8":
        rule = (
            f"needs a Blackwell GPU (compute capability 10.0), and GPU {gpu.name or '(unnamed)'} states no "
            "compute_capability; set it in the profile, or use --precision fp8"
        )
        return [Violation("precision", precision, rule)]
    if not _priced(precision, gpu):
        rule = f"has no {precision} peak in GPU {gpu.name or '(unnamed)'}'s datasheet figures; {instead}"
        return [Violation("precision", precision, rule)]
    return []


def with_gpu_precision(training: TrainingSpec, gpu: GpuSpec) -> TrainingSpec:
    """``training`` with fp16 for bf16 where the precision was left at its default and the GPU has no BF16
    (V100): the default is the GPU's 16-bit format, as a Megatron user on V100 runs ``--fp16``."""
    if "precision" in training.model_fields_set or not precision_rules(training, gpu):
        return training
    fp16 = training.model_copy(update={"precision": "fp16"})
    return training if precision_rules(fp16, gpu) else fp16


def grouped_gemm_supported(gpu: GpuSpec | None) -> bool:
    """Whether Megatron runs ``--moe-grouped-gemm`` on this GPU (assumed where its capability is unknown)."""
    return gpu is None or gpu.capability is None or gpu.capability >= GROUPED_GEMM_CAPABILITY


def hardware_rules(
    model: ModelSpec, training: TrainingSpec, p: ParallelConfig, gpu: GpuSpec
) -> list[Violation]:
    """Rule 13: what the layout asks of the GPU. Of the layout it reads only ``grouped_gemm`` and
    ``dispatcher``."""
    out = precision_rules(training, gpu)
    if model.is_moe and p.grouped_gemm and not grouped_gemm_supported(gpu):
        rule = f"needs compute capability 8.0 or more ({_capability(gpu)}); set grouped_gemm false"
        out.append(Violation("grouped_gemm", True, rule))
    kind = dispatcher(p.dispatcher.kind)
    out += [Violation("dispatcher", kind.kind, rule) for rule in kind.hardware_rules(p.dispatcher, gpu)]
    return out


def check_plan(
    model: ModelSpec,
    training: TrainingSpec,
    parallel: ParallelConfig,
    world_size: int,
    gpu: GpuSpec | None = None,
) -> list[Violation]:
    """Every rule the configuration breaks; empty when it can run. The GPU's rules apply when it is given."""
    return [
        *check_grid(parallel, world_size),
        *_model_rules(model, parallel),
        *_layer_rules(model, parallel),
        *_batch_rules(training, parallel, model),
        *_pipeline_rules(training, parallel),
        *_dispatch_rules(model, parallel),
        *_fp8_param_rules(training, parallel),
        *_attention_rules(parallel),
        *_sharding_rules(parallel),
        *_overlap_rules(parallel),
        *_tp_overlap_rules(model, parallel),
        *_delay_wgrad_rules(parallel),
        *cuda_graph_rules(model, training, parallel),
        *(hardware_rules(model, training, parallel, gpu) if gpu is not None else ()),
    ]


def _fp8_param_rules(training: TrainingSpec, p: ParallelConfig) -> list[Violation]:
    """``--fp8-param-gather`` (Megatron-LM arguments.py at d98e8a6): "fp8_param must be used together with
    fp8 mode" (transformer_config.py); "only supported with distributed optimizer, torch fsdp2, megatron fsdp,
    or inference mode"; with optimizer CPU offload only under the delayed recipe, which moeplan does not
    emit (its FP8 is blockwise or MXFP8)."""
    if not p.fp8_param_gather:
        return []
    out = []
    if training.precision not in ("fp8", "mxfp8"):
        out.append(Violation("fp8_param_gather", True, f"needs FP8 training, not {training.precision}"))
    if not (p.distributed_optimizer or p.fsdp):
        out.append(Violation("fp8_param_gather", True, "needs the distributed optimizer or FSDP", True))
    if p.optimizer.offloads:
        out.append(
            Violation(
                "fp8_param_gather", True,
                "cannot be combined with optimizer CPU offload under the blockwise or MXFP8 recipe", True,
            )
        )  # fmt: skip
    return out


def _attention_rules(p: ParallelConfig) -> list[Violation]:
    """Context parallelism runs in Transformer Engine's fused attention (its ``attn_forward_func_with_cp``);
    unfused attention holds whole sequences."""
    if p.attention_backend == "unfused" and p.cp > 1:
        return [
            Violation(
                "attention_backend",
                "unfused",
                f"needs cp 1, not {p.cp}: context parallelism runs in fused attention",
            )
        ]
    return []


def _overlap_rules(p: ParallelConfig) -> list[Violation]:
    """Rule 16: the data-parallel overlap can be turned off only under Megatron's data parallelism."""
    if p.overlap_grad_reduce or p.dp_sharding != "fsdp2":
        return []
    rule = "cannot be off with dp_sharding fsdp2: FSDP2 prefetches and reduces each layer asynchronously"
    return [Violation("overlap_grad_reduce", False, rule)]


def _tp_overlap_rules(model: ModelSpec, p: ParallelConfig) -> list[Violation]:
    """Rule 17: where Megatron-Core runs ``--tp-comm-overlap``."""
    if not p.tp_comm_overlap:
        return []
    out = []
    if p.tp == 1 or not p.sequence_parallel:
        why = "tp is 1, where Megatron turns sequence parallelism off" if p.tp == 1 else "it is off"
        out.append(Violation("tp_comm_overlap", True, f"needs sequence parallelism with tp above 1 ({why})"))
    if model.attention == "mla":
        rule = (
            "cannot run with MLA: Megatron-Core turns the overlap off when an MLA projection asks Transformer "
            "Engine for a userbuffer other than qkv, proj, fc1 or fc2"
        )
        out.append(Violation("tp_comm_overlap", True, rule))
    return out


def _delay_wgrad_rules(p: ParallelConfig) -> list[Violation]:
    """Rule 18: Megatron-Core delays the weight gradients only inside its EP overlap's schedule."""
    if p.delay_wgrad_compute and not p.a2a_overlap:
        rule = "needs a2a_overlap (--overlap-moe-expert-parallel-comm), whose schedule runs the delayed gradients"
        return [Violation("delay_wgrad_compute", True, rule)]
    return []


def _sharding_rules(p: ParallelConfig) -> list[Violation]:
    """FSDP2 shards what ``distributed_optimizer`` or ``fsdp`` says is sharded, and keeps its own state:
    FP32 parameter shards with PyTorch's AdamW on them (no Megatron optimizer settings)."""
    if p.dp_sharding != "fsdp2":
        return []
    out = []
    if not (p.distributed_optimizer or p.fsdp):
        out.append(
            Violation("dp_sharding", "fsdp2", "needs distributed_optimizer or fsdp: nothing is sharded")
        )
    if p.optimizer != type(p.optimizer)():
        rule = "keeps FP32 gradients and Adam state on the GPU: the optimizer settings must be the defaults"
        out.append(Violation("dp_sharding", "fsdp2", rule))
    if p.fp8_param_gather:
        out.append(Violation("dp_sharding", "fsdp2", "gathers BF16 weights: fp8_param_gather must be false"))
    return out


def cuda_graph_rules(model: ModelSpec, training: TrainingSpec, p: ParallelConfig) -> list[Violation]:
    """Rule 15: what Megatron-Core's CUDA graphs capture (see the module docstring)."""
    scopes = p.cuda_graphs
    if not scopes:
        return []
    out = []

    def refuse(rule: str) -> None:
        out.append(Violation("cuda_graphs", list(scopes), rule))

    full = "full_iteration" in scopes
    if full and len(scopes) > 1:
        refuse(
            "full_iteration stands alone: it is Megatron-Core's local graph, the others Transformer Engine's"
        )
    if "moe_preprocess" in scopes and "moe_router" not in scopes:
        refuse("moe_preprocess is captured only with moe_router")
    if "moe_router" in scopes and not model.is_moe:
        refuse("moe_router needs an MoE model")
    if "mlp" in scopes and model.num_dense_layers == 0:
        refuse("mlp captures dense layers' FFNs, and the model has none")
    if "moe_preprocess" in scopes and p.dispatcher.kind == "alltoall" and training.routing == "capacity":
        refuse(
            "moe_preprocess cannot capture the all-to-all dispatcher's preprocessing under capacity routing"
        )
    if p.recompute == "full" and not full:
        refuse("full recompute is only supported with a full_iteration graph")
    if "moe" in p.effective_recompute_modules and "moe_router" in scopes:
        refuse("recomputing moe is not supported with a moe_router graph")
    if p.a2a_overlap and (full or "mlp" in scopes):
        refuse("the EP all-to-all overlap takes Transformer Engine's graphs without mlp")
    if full and model.is_moe:
        refuse(
            "a full_iteration graph needs MoE layers of fixed shapes (Megatron-Core 0.18's paged stash, whose "
            "static buffers moeplan does not price); use attn, moe_router and moe_preprocess"
        )
    return out


def choice_rules(model: ModelSpec, training: TrainingSpec, parallel: ParallelConfig) -> list[Violation]:
    """The rules of ``check_plan`` besides ``degree_rules`` and ``hardware_rules`` (3, 4, 7 to 11, 14 to 18): with
    those two, every rule ``check_plan`` checks."""
    return [
        *_model_rules(model, parallel),
        *_batch_rules(training, parallel, model),
        *_dispatch_rules(model, parallel),
        *_fp8_param_rules(training, parallel),
        *_attention_rules(parallel),
        *_sharding_rules(parallel),
        *_overlap_rules(parallel),
        *_tp_overlap_rules(model, parallel),
        *_delay_wgrad_rules(parallel),
        *cuda_graph_rules(model, training, parallel),
    ]


def degree_rules(
    model: ModelSpec, training: TrainingSpec, parallel: ParallelConfig, world_size: int
) -> list[Violation]:
    """The rules of ``check_plan`` that read only the degrees, the micro-batch and the stage split (1, 2,
    5, 6 and 12): layouts that differ only in recompute, dispatcher or overlap all pass or all fail them."""
    return [
        *check_grid(parallel, world_size),
        *_layer_rules(model, parallel),
        *_pipeline_rules(training, parallel),
    ]


def require_feasible(
    model: ModelSpec,
    training: TrainingSpec,
    parallel: ParallelConfig,
    world_size: int,
    megatron: bool = True,
    gpu: GpuSpec | None = None,
) -> list[Violation]:
    """Raise one SpecError naming every broken rule; return the Megatron-only ones when ``megatron`` is off."""
    found = check_plan(model, training, parallel, world_size, gpu)
    violations = [v for v in found if megatron or not v.megatron_only]
    if violations:
        listed = "; ".join(str(v) for v in violations)
        raise SpecError(
            f"the parallel configuration cannot run '{model.name}' on {world_size} GPUs: {listed}."
        )
    return [v for v in found if v.megatron_only]
