"""Plan -> Megatron-LM arguments, and a shell snippet exporting its environment (Megatron-Core 0.12 to 0.19).

Flag names follow Megatron-LM (``../shared/reference/ecosystem.md`` §1.2-1.4). The rules it enforces
(§1.5) are checked first (``planner.emit.megatron_rules``), so a plan Megatron would reject is a
SpecError, not a failed launch.
tests/unit/test_emit.py builds megatron-core's own TransformerConfig from the emitted flags.

Choices:

- VPP is ``--num-virtual-stages-per-pipeline-rank`` (the Plan's ``vpp`` as it is, and the only VPP flag
  that combines with an uneven split), never ``--num-layers-per-virtual-pipeline-stage``.
- An uneven ``layers_per_stage`` becomes ``--decoder-first/last-pipeline-num-layers`` when Megatron's
  placement can express it: every virtual stage of a rank holds the same number of layers, the middle
  ranks hold the same number, the first and last ranks hold at least one. Anything else is a SpecError.
- No tokenizer or vocabulary flag: Megatron sizes the embedding from the tokenizer. The snippet's
  comment says how to get the model's vocabulary with ``NullTokenizer`` for synthetic runs.
- Architecture every catalog model shares but ModelSpec does not name: RMSNorm, RoPE, no bias on the
  linear layers (``--add-qkv-bias`` adds the QKV bias back).
- No ``--use-mcore-models``: Megatron-Core models are the default in every supported release.
- Top-1 routing adds ``--moe-router-pre-softmax`` (Megatron refuses top-1 with softmax after top-k).
- Precision: ``--bf16``, plus ``--fp8-format e4m3 --fp8-recipe blockwise`` (``fp8``, Hopper) or
  ``--fp8-recipe mxfp8`` (``mxfp8``, Blackwell). There is no ``--fp8`` flag.
- Routing ``balanced`` is ``--moe-router-force-load-balancing``: random router logits, for benchmarks
  only (in Megatron-LM's arguments.py of core 0.14/0.15 and in megatron-core 0.16.1's TransformerConfig).
- DeepEP and Hybrid-EP run on the SMs the plan priced (``DispatcherSpec.num_sms``, else Megatron-Core 0.16's
  20 and 16), stated with each release's flag: ``--moe-deepep-num-sms`` (0.13 on), ``--moe-hybridep-num-sms``
  (0.16 on), ``--moe-flex-dispatcher-num-sms`` (0.19 on).
- Version gates (§1.7): ``--moe-flex-dispatcher-backend`` from 0.16 (``--moe-enable-deepep`` before, DeepEP
  only); EP all-to-all overlap, forced balancing, router fusion and Megatron-FSDP from 0.14; releases before
  0.12 refused (a plan with ``moe_router_fusion`` off launches on 0.12 and 0.13).
"""

from __future__ import annotations

import shlex

from planner.costmodel.dispatchers import dispatcher
from planner.emit.megatron_rules import (
    FLAG_SINCE,
    check_megatron_rules,
    needs_layout,
    parse_megatron_version,
    pipeline_layout,
    reject,
    require_release,
    uneven_pipeline_split,
)
from planner.schema import DispatcherSpec, ModelSpec, Plan

__all__ = [
    "DEFAULT_MEGATRON_VERSION",
    "emit_megatron",
    "megatron_args",
    "megatron_env",
    "parse_megatron_version",
]

DEFAULT_MEGATRON_VERSION = "0.16"
"""Megatron-Core release the emitted flags target unless told otherwise."""

Flags = list[list[str]]
"""Each inner list is one flag with its values: one line of the snippet."""


def _semantics_flags(model: ModelSpec, version: tuple[int, int]) -> Flags:
    """What the model computes beyond its sizes (``ModelSpec``'s semantics fields): the norm, rotary
    embedding, attention variants, biases and activation. A field the model leaves null writes nothing, and
    ``_unstated`` says in the snippet which Megatron default applies."""
    flags = [["--normalization", model.normalization]]
    if model.norm_epsilon is not None:
        flags.append(["--norm-epsilon", repr(model.norm_epsilon)])
    mla = model.attention == "mla" and model.mla is not None
    yarn = model.yarn
    # YaRN outside MLA is a position-embedding type of its own (0.19 on; check_megatron_rules refused it
    # before); MLA's is its default rope type, its context and betas fixed (MLATransformerConfig).
    own_yarn = yarn is not None and not mla
    flags.append(["--position-embedding-type", "yarn" if own_yarn else "rope"])
    if model.rotary_base is not None:
        flags.append(["--rotary-base", str(model.rotary_base)])
    if yarn is not None:
        flags += [
            ["--rotary-scaling-factor", f"{yarn.factor:g}"],
            ["--mscale", f"{yarn.mscale:g}"],
            ["--mscale-all-dim", f"{yarn.mscale_all_dim:g}"],
        ]
    if yarn is not None and own_yarn:
        flags += [
            ["--yarn-original-max-position-embeddings", str(yarn.original_max_position_embeddings)],
            ["--yarn-beta-fast", f"{yarn.beta_fast:g}"],
            ["--yarn-beta-slow", f"{yarn.beta_slow:g}"],
            [
                "--yarn-correction-range-round-to-int"
                if yarn.truncate
                else "--no-yarn-correction-range-round-to-int"
            ],
        ]
    if yarn is None and mla and version >= FLAG_SINCE["--rope-type"]:
        # MLA's default is YaRN (before 0.14 its factor 1.0 is plain RoPE). Megatron-LM's command line fuses
        # RoPE by default, which MLATransformerConfig allows with YaRN only ("apply_rope_fusion for MLA only
        # works with YARN RoPE", transformer_config.py:2068 at core_v0.16.1, the same through 0.19).
        flags += [["--rope-type", "rope"], ["--no-rope-fusion"]]
    if model.qk_layernorm:
        flags.append(["--qk-layernorm"])
    if model.window_size is not None:
        require_release(version, "--window-size", "window_size", list(model.window_size))
        flags.append(["--window-size", ",".join(str(n) for n in model.window_size)])
        if model.window_attn_skip_freq is not None:
            flags.append(["--window-attn-skip-freq", str(model.window_attn_skip_freq)])
    if model.softmax_type != "vanilla":
        require_release(version, "--softmax-type", "softmax_type", model.softmax_type)
        flags.append(["--softmax-type", model.softmax_type])
    if not model.add_bias_linear:
        flags.append(["--disable-bias-linear"])
    flags += _activation_flags(model, version)
    return flags


def _activation_flags(model: ModelSpec, version: tuple[int, int]) -> Flags:
    """SwiGLU (``--swiglu``), gpt-oss's clamped quick-GeGLU, or Megatron-LM's default GELU MLP."""
    gated, act = model.gated_linear_unit, model.activation
    if gated and act == "silu":
        flags = [["--swiglu"]]
    elif gated and act == "quick_gelu":
        require_release(version, "--quick-geglu", "activation", act)
        flags = [["--quick-geglu"]]
    elif not gated and act == "gelu":
        flags = []
    else:
        kind = "gated" if gated else "ungated"
        raise reject("activation", act, f"{kind} has no Megatron-LM flag (SwiGLU, quick-GeGLU or a GELU MLP)")
    if model.glu_linear_offset:
        require_release(version, "--quick-geglu", "glu_linear_offset", model.glu_linear_offset)
        flags.append(["--glu-linear-offset", repr(model.glu_linear_offset)])
    if model.activation_clamp_value is not None:
        require_release(version, "--quick-geglu", "activation_clamp_value", model.activation_clamp_value)
        flags.append(["--activation-func-clamp-value", repr(model.activation_clamp_value)])
    return flags


def _router_flags(model: ModelSpec, version: tuple[int, int]) -> Flags:
    """The router's semantics: score function, top-k order, scaling, expert bias, balancing losses."""
    flags = [["--moe-router-score-function", model.moe_router_score_function]]
    # Megatron-LM asks --moe-router-pre-softmax of top-1 softmax routing (transformer_config.py).
    if model.moe_router_pre_softmax or (
        model.moe_router_topk == 1 and model.moe_router_score_function == "softmax"
    ):
        flags.append(["--moe-router-pre-softmax"])
    if model.moe_router_topk_scaling_factor is not None:
        flags.append(["--moe-router-topk-scaling-factor", repr(model.moe_router_topk_scaling_factor)])
    if model.moe_router_enable_expert_bias:
        flags.append(["--moe-router-enable-expert-bias"])
        if model.moe_router_bias_update_rate is not None:
            flags.append(["--moe-router-bias-update-rate", repr(model.moe_router_bias_update_rate)])
    if model.moe_router_load_balancing_type is not None:
        if model.moe_router_load_balancing_type == "global_aux_loss":
            require_release(version, "global_aux_loss", "moe_router_load_balancing_type", "global_aux_loss")
        flags.append(["--moe-router-load-balancing-type", model.moe_router_load_balancing_type])
    if model.moe_aux_loss_coeff is not None:
        flags.append(["--moe-aux-loss-coeff", repr(model.moe_aux_loss_coeff)])
    if model.moe_z_loss_coeff is not None:
        flags.append(["--moe-z-loss-coeff", repr(model.moe_z_loss_coeff)])
    if model.moe_shared_expert_gate:
        require_release(version, "--moe-shared-expert-gate", "moe_shared_expert_gate", True)
        flags.append(["--moe-shared-expert-gate"])
    return flags


def _unstated(model: ModelSpec) -> list[str]:
    """The semantics the model leaves null, with the Megatron-LM default that the arguments then train."""
    out = []
    if model.norm_epsilon is None:
        out.append("norm epsilon (Megatron-LM's 1e-5)")
    if model.rotary_base is None:
        out.append("rotary base (Megatron-LM's 10000)")
    if model.is_moe:
        if model.moe_router_load_balancing_type is None:
            out.append("load-balancing type (Megatron-LM's aux_loss)")
        if model.moe_aux_loss_coeff is None and model.moe_router_load_balancing_type != "none":
            out.append("load-balancing coefficient (Megatron-LM's 0.0: nothing is balanced)")
        if model.moe_router_enable_expert_bias and model.moe_router_bias_update_rate is None:
            out.append("expert-bias update rate (Megatron-LM's 1e-3)")
    if model.mtp_num_layers and model.mtp_loss_scaling_factor is None:
        out.append("MTP loss scale (Megatron-LM's 0.1)")
    return out


def _model_flags(model: ModelSpec, seq_len: int, version: tuple[int, int]) -> Flags:
    flags = [
        ["--num-layers", str(model.num_layers)],
        ["--hidden-size", str(model.hidden_size)],
        ["--ffn-hidden-size", str(model.ffn_hidden_size)],
        ["--num-attention-heads", str(model.num_attention_heads)],
    ]
    if model.attention == "mla" and model.mla is not None:
        mla = model.mla
        flags.append(["--multi-latent-attention"])
        if mla.q_lora_rank is not None:
            flags.append(["--q-lora-rank", str(mla.q_lora_rank)])
        flags += [
            ["--kv-lora-rank", str(mla.kv_lora_rank)],
            ["--qk-head-dim", str(mla.qk_head_dim)],
            ["--qk-pos-emb-head-dim", str(mla.qk_pos_emb_head_dim)],
            ["--v-head-dim", str(mla.v_head_dim)],
        ]
    else:
        if model.query_groups != model.num_attention_heads:
            flags += [["--group-query-attention"], ["--num-query-groups", str(model.query_groups)]]
        if model.kv_channels is not None:
            flags.append(["--kv-channels", str(model.kv_channels)])
    flags += _semantics_flags(model, version)
    if model.untie_embeddings_and_output_weights:
        flags.append(["--untie-embeddings-and-output-weights"])
    if model.add_qkv_bias:
        flags.append(["--add-qkv-bias"])
    if model.mtp_num_layers:
        flags.append(["--mtp-num-layers", str(model.mtp_num_layers)])
        if model.mtp_loss_scaling_factor is not None:
            flags.append(["--mtp-loss-scaling-factor", repr(model.mtp_loss_scaling_factor)])
    # Dropout off, as the catalog's models train (their configs' attention and hidden dropout are 0) and as
    # the estimate prices them: Megatron-LM's defaults are 0.1 each.
    flags += [["--attention-dropout", "0.0"], ["--hidden-dropout", "0.0"]]
    return [*flags, ["--seq-length", str(seq_len)], ["--max-position-embeddings", str(seq_len)]]


def _dispatcher_flags(plan: Plan, version: tuple[int, int]) -> Flags:
    d = plan.parallel.dispatcher
    kind = dispatcher(d.kind)
    assert kind.megatron_type is not None  # check_megatron_rules refused the kinds Megatron lacks
    if not kind.backends:
        return [["--moe-token-dispatcher-type", kind.megatron_type]]
    backend = d.backend or kind.default_backend
    assert backend is not None
    if version >= (0, 16):
        flags = [
            ["--moe-token-dispatcher-type", kind.megatron_type],
            ["--moe-flex-dispatcher-backend", backend],
        ]
    else:
        flags = [["--moe-token-dispatcher-type", kind.megatron_type], ["--moe-enable-deepep"]]  # DeepEP only
    return flags + _dispatcher_sms_flags(d, backend, kind.comm_sms(d), version)


def _dispatcher_sms_flags(d: DispatcherSpec, backend: str, sms: int, version: tuple[int, int]) -> Flags:
    """The SMs the plan priced the kernel library on, stated: the releases' defaults differ (core 0.19 leaves
    Hybrid-EP's to the library), so the launch holds what was priced."""
    if version >= FLAG_SINCE["--moe-flex-dispatcher-num-sms"]:
        return [["--moe-flex-dispatcher-num-sms", str(sms)]]
    flag = f"--moe-{backend}-num-sms"
    if d.num_sms is None and version < FLAG_SINCE[flag]:
        return []  # core 0.12 leaves DeepEP at its own default, Buffer.num_sms = 20: the count priced
    require_release(version, flag, "dispatcher.num_sms", sms)
    return [[flag, str(sms)]]


def _moe_flags(plan: Plan, model: ModelSpec, version: tuple[int, int]) -> Flags:
    if model.num_experts is None or model.moe_router_topk is None:
        return []
    flags = [
        ["--num-experts", str(model.num_experts)],
        ["--moe-ffn-hidden-size", str(model.expert_ffn_hidden_size)],
        ["--moe-router-topk", str(model.moe_router_topk)],
    ]
    flags += _router_flags(model, version)
    if model.shared_expert_ffn_hidden_size:
        flags.append(["--moe-shared-expert-intermediate-size", str(model.shared_expert_ffn_hidden_size)])
    if model.first_k_dense_layers:
        dense, moe = model.first_k_dense_layers, model.num_moe_layers
        flags.append(["--moe-layer-freq", f"([0]*{dense}+[1]*{moe})"])
    if model.moe_router_num_groups is not None and model.moe_router_group_topk is not None:
        flags += [
            ["--moe-router-num-groups", str(model.moe_router_num_groups)],
            ["--moe-router-group-topk", str(model.moe_router_group_topk)],
        ]
    if plan.parallel.grouped_gemm:
        flags.append(["--moe-grouped-gemm"])
    flags += [["--moe-permute-fusion"], ["--moe-router-dtype", "fp32"]]
    if plan.parallel.moe_router_fusion:
        require_release(version, "--moe-router-fusion", "moe_router_fusion", True)
        flags.append(["--moe-router-fusion"])
    flags += _dispatcher_flags(plan, version)
    if plan.parallel.a2a_overlap:
        flags.append(["--overlap-moe-expert-parallel-comm"])
    if plan.parallel.delay_wgrad_compute:
        flags.append(["--delay-wgrad-compute"])
    training = plan.training
    if training.routing == "capacity":
        assert training.capacity_factor is not None  # TrainingSpec requires it with capacity routing
        flags.append(["--moe-expert-capacity-factor", repr(float(training.capacity_factor))])
    elif training.routing == "balanced":
        flags.append(["--moe-router-force-load-balancing"])
    return flags


def _parallel_flags(plan: Plan, model: ModelSpec) -> Flags:
    p = plan.parallel
    flags = [["--tensor-model-parallel-size", str(p.tp)], ["--pipeline-model-parallel-size", str(p.pp)]]
    if needs_layout(plan, model):
        # An arbitrary stage split (the solver's): the layout implies the virtual stages, and Megatron
        # accepts at most one of layout, layers-per-vstage and vstages-per-rank (ecosystem.md §1.5.6).
        flags.append(["--pipeline-model-parallel-layout", pipeline_layout(plan, model)])
        split = None
    else:
        if p.vpp > 1:
            flags.append(["--num-virtual-stages-per-pipeline-rank", str(p.vpp)])
        split = uneven_pipeline_split(plan, model)
    if split is not None:
        flags += [
            ["--decoder-first-pipeline-num-layers", str(split[0])],
            ["--decoder-last-pipeline-num-layers", str(split[1])],
        ]
    flags.append(["--context-parallel-size", str(p.cp)])
    if model.is_moe:
        flags += [["--expert-model-parallel-size", str(p.ep)], ["--expert-tensor-parallel-size", str(p.etp)]]
    if p.tp > 1 and p.sequence_parallel:
        flags.append(["--sequence-parallel"])
    if p.tp_comm_overlap:  # Transformer Engine's defaults (no --tp-comm-overlap-cfg): what moeplan prices
        flags.append(["--tp-comm-overlap"])
    if p.fsdp:
        flags += [["--use-megatron-fsdp"], ["--data-parallel-sharding-strategy", "optim_grads_params"]]
    sharded = p.distributed_optimizer or p.fsdp
    if sharded:
        flags.append(["--use-distributed-optimizer"])
    if p.overlap_grad_reduce:  # off: Megatron-LM's default, no flag
        flags.append(["--overlap-grad-reduce"])
        if sharded:
            flags.append(["--overlap-param-gather"])
    return [
        *flags,
        ["--micro-batch-size", str(p.micro_batch)],
        ["--global-batch-size", str(plan.training.global_batch)],
    ]


def _recompute_and_precision_flags(plan: Plan) -> Flags:
    p, flags = plan.parallel, []
    if p.recompute == "selective":
        flags += [
            ["--recompute-granularity", "selective"],
            ["--recompute-modules", *p.effective_recompute_modules],
        ]
    elif p.recompute == "full":
        flags += [
            ["--recompute-granularity", "full"],
            ["--recompute-method", "uniform"],
            ["--recompute-num-layers", "1"],
        ]
    # FP8 recipes run on BF16 parameters; fp16 is Megatron's --fp16 with its dynamic loss scaler.
    flags.append(["--fp16"] if plan.training.precision == "fp16" else ["--bf16"])
    recipe = {"bf16": None, "fp16": None, "fp8": "blockwise", "mxfp8": "mxfp8"}[plan.training.precision]
    if recipe is not None:
        flags += [["--fp8-format", "e4m3"], ["--fp8-recipe", recipe]]
    if p.attention_backend == "unfused":  # else Megatron-LM's auto: FlashAttention or cuDNN's fused
        flags.append(["--attention-backend", "unfused"])
    if p.fp8_param_gather:
        flags.append(["--fp8-param-gather"])
        if recipe == "mxfp8":  # else MXFP8's BF16 gather takes a buffer of its own (optimizer_config.py)
            flags.append(["--reuse-grad-buf-for-mxfp8-param-ag"])
    return flags


def _optimizer_flags(plan: Plan, version: tuple[int, int]) -> Flags:
    """Model-state settings (``OptimizerConfig``): gradient and Adam-state dtypes, CPU offload."""
    o, flags = plan.parallel.optimizer, []
    if o.main_grads_dtype == "bf16":
        flags.append(["--grad-reduce-in-bf16"])
    if plan.parallel.fsdp and version >= FLAG_SINCE["--megatron-fsdp-main-grads-dtype"]:
        # From core_v0.17 Megatron-FSDP's gradient buffer takes the parameters' dtype (BF16) unless told
        # (``_resolve_group_grad_dtype``), whatever --accumulate-allreduce-grads-in-fp32 says: the plan's
        # dtype is written out. Before, it followed grad_reduce_in_fp32 as the DDP buffer does.
        flags.append(["--megatron-fsdp-main-grads-dtype", o.main_grads_dtype])
    if o.precision_aware:
        flags.append(["--use-precision-aware-optimizer"])
        if o.main_grads_dtype == "bf16":
            flags.append(["--main-grads-dtype", "bf16"])
        if o.exp_avg_dtype != "fp32":
            flags += [["--exp-avg-dtype", o.exp_avg_dtype], ["--exp-avg-sq-dtype", o.exp_avg_dtype]]
    if o.offloads:
        flags += [["--optimizer-cpu-offload"], ["--optimizer-offload-fraction", f"{o.offload_fraction:g}"]]
        if o.overlap_offload:
            flags.append(["--overlap-cpu-optimizer-d2h-h2d"])
    return flags


def _flag_groups(plan: Plan, model: ModelSpec, megatron_version: str) -> Flags:
    version = parse_megatron_version(megatron_version)
    check_megatron_rules(plan, model, version)
    return [
        *_model_flags(model, plan.training.seq_len, version),
        *_moe_flags(plan, model, version),
        *_parallel_flags(plan, model),
        *_recompute_and_precision_flags(plan),
        *_optimizer_flags(plan, version),
        *_cuda_graph_flags(plan, version),
    ]


def _cuda_graph_flags(plan: Plan, version: tuple[int, int]) -> Flags:
    """The plan's CUDA graphs (``ParallelConfig.cuda_graphs``). From core_v0.18 the per-layer scopes are
    ``--cuda-graph-modules`` and a full-iteration graph is ``--cuda-graph-impl full_iteration``; in 0.16
    and 0.17 both are ``--cuda-graph-scope``, full iteration under the ``local`` implementation. A
    full-iteration graph cannot hold the NaN check's host synchronisation (arguments.py:725 at core_v0.16.1,
    "--no-check-for-nan-in-loss-and-grad should be set"). Megatron turns on ``--te-rng-tracker`` itself."""
    scopes = list(plan.parallel.cuda_graphs)
    if not scopes:
        return []
    modules = version >= FLAG_SINCE["--cuda-graph-modules"]
    if scopes == ["full_iteration"]:
        impl = [["--cuda-graph-impl", "full_iteration"]] if modules else [
            ["--cuda-graph-impl", "local"], ["--cuda-graph-scope", "full_iteration"]
        ]  # fmt: skip
        return [*impl, ["--no-check-for-nan-in-loss-and-grad"]]
    return [
        ["--cuda-graph-impl", "transformer_engine"],
        ["--cuda-graph-modules" if modules else "--cuda-graph-scope", *scopes],
    ]


def megatron_args(
    plan: Plan, model: ModelSpec, megatron_version: str = DEFAULT_MEGATRON_VERSION
) -> list[str]:
    """Megatron-LM command-line arguments (model, parallel, batch, recompute, precision, MoE) for ``plan``."""
    return [token for group in _flag_groups(plan, model, megatron_version) for token in group]


def megatron_env(plan: Plan) -> dict[str, str]:
    """Environment Megatron-LM needs for ``plan``.

    ``CUDA_DEVICE_MAX_CONNECTIONS=1`` is asserted by Megatron when tp or cp is above 1 (before Blackwell),
    except with Megatron-FSDP or the EP all-to-all overlap, which want several connections (§1.5 rule 10).
    With optimizer CPU offload, ``OMP_NUM_THREADS`` is a shell expansion: the node's cores over its GPUs.
    ``NCCL_NVLS_ENABLE=0``, as Megatron-LM's MoE guide and Megatron-Bridge's recipes set it: NVLink SHARP's
    buffers take 0.25-1.5 GiB per intra-node communicator (``costmodel.memory.RESERVE_BYTES``), which the
    estimate's reserve does not hold, and its faster all-reduce is not what the estimate prices either.
    """
    p = plan.parallel
    env = {}
    if (p.tp > 1 or p.cp > 1) and not (p.a2a_overlap or p.fsdp):
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if p.cuda_graphs and "full_iteration" not in p.cuda_graphs:
        # Megatron-LM refuses Transformer Engine's graphs under expandable segments unless NCCL does not
        # register the graphs' buffers (arguments.py:1247-1253 at core_v0.16.1: "illegal memory access").
        env["NCCL_GRAPH_REGISTER"] = "0"
    env["NCCL_NVLS_ENABLE"] = "0"
    if p.optimizer.offloads:
        # torchrun starts every process with one OpenMP thread; the host's Adam (priced at the host's
        # memory bandwidth, costmodel/optimizer.py) needs each process's share of the cores.
        env["OMP_NUM_THREADS"] = f"$(( $(nproc) / {plan.num_gpus_per_node} ))"
    return env


def _shell_value(value: str) -> str:
    """A value as one shell word: quoted, except an arithmetic expansion (``$(( ... ))``) meant to run."""
    return value if value.startswith("$((") and value.endswith("))") else shlex.quote(value)


def _one_line(text: str) -> str:
    return " ".join(text.split())


TE_FLOORS_FOR_DELAYED_WGRAD: tuple[tuple[tuple[int, int], str, str, str], ...] = (
    ((0, 15), "overlap_grad_reduce", "2.8", "with --overlap-grad-reduce (arguments.py:1176 at core_v0.15.0)"),
    (
        (0, 16),
        "cuda_graphs",
        "2.10",
        "with Transformer Engine's CUDA graphs (transformer_config.py:1916 at core_v0.16.0)",
    ),
    ((0, 17), "cuda_graphs", "2.12", "with CUDA graphs (arguments.py:1528 at core_v0.17.1)"),
)
"""(first Megatron-Core release, the plan setting beside ``delay_wgrad_compute``, the Transformer Engine
release it asks for, where): the floors Megatron-LM's checks put on ``--delay-wgrad-compute``."""


def _te_floor(plan: Plan, megatron_version: str) -> str | None:
    """The note naming the newest Transformer Engine the delayed weight gradients need on this release."""
    if not plan.parallel.delay_wgrad_compute:
        return None
    version = parse_megatron_version(megatron_version)
    floor = None
    for since, setting, te, where in TE_FLOORS_FOR_DELAYED_WGRAD:
        if version >= since and getattr(plan.parallel, setting):
            floor = (te, where)  # later entries ask for more
    if floor is None:
        return None
    te, where = floor
    return f"Needs Transformer Engine {te} or later: validate_args refuses --delay-wgrad-compute {where} on an older one."


def _comments(plan: Plan, model: ModelSpec, megatron_version: str) -> list[str]:
    where = _one_line(f"{plan.model.name} on {plan.cluster.name}")
    vocab = model.vocab_size
    notes = [
        f"Megatron-LM arguments for the moeplan plan of {where}, {plan.num_gpus} GPUs "
        f"(moeplan {_one_line(plan.provenance.moeplan_version)}).",
        f"Target: Megatron-Core {_one_line(megatron_version)}. Append data, tokenizer and learning-rate flags:",
        '  torchrun <launcher flags> pretrain_gpt.py "${MEGATRON_ARGS[@]}" <data/tokenizer/learning-rate flags>',
        f"Vocabulary {vocab} comes from the tokenizer; for synthetic runs add --mock-data",
        f"  --tokenizer-type NullTokenizer --vocab-size {vocab - 1} (NullTokenizer adds an EOD token).",
    ]
    unstated = _unstated(model)
    if unstated:
        notes.append(f"Not stated by the model, so Megatron-LM's defaults train: {'; '.join(unstated)}.")
    if plan.training.routing == "balanced" and model.is_moe:
        notes.append(
            "routing 'balanced': --moe-router-force-load-balancing routes on random logits (benchmarks)."
        )
    if plan.parallel.fsdp:
        notes.append(
            "Megatron-FSDP examples also pass --ckpt-format fsdp_dtensor --no-gradient-accumulation-fusion."
        )
    floor = _te_floor(plan, megatron_version)
    if floor:
        notes.append(floor)
    return [f"# {note}" for note in notes]


def emit_megatron(plan: Plan, model: ModelSpec, megatron_version: str = DEFAULT_MEGATRON_VERSION) -> str:
    """A bash snippet: exported environment, then ``MEGATRON_ARGS=( ... )`` with one flag per line."""
    groups = _flag_groups(plan, model, megatron_version)
    lines = [
        *_comments(plan, model, megatron_version),
        *(f"export {name}={_shell_value(value)}" for name, value in megatron_env(plan).items()),
        "MEGATRON_ARGS=(",
        *("    " + " ".join(shlex.quote(token) for token in group) for group in groups),
        ")",
    ]
    return "\n".join(lines) + "\n"
