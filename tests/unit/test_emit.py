"""The emitters: exact Megatron flags, megatron-core accepting them, canonical plan JSON, torchtitan overrides
constraints, and launch scripts that survive the shell (bash parses and runs them with stubbed tools)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from planner.catalog import load_model
from planner.emit import (
    FORMATS,
    SlurmOptions,
    emit_megatron,
    emit_plan_json,
    emit_slurm,
    emit_torchrun,
    emit_torchtitan,
    load_plan,
    megatron_args,
    megatron_env,
    parse_megatron_version,
    torchtitan_config,
    write_plan,
)
from planner.errors import SpecError
from planner.schema import (
    ClusterRef,
    CostTerm,
    DispatcherSpec,
    Estimate,
    ModelRef,
    ModelSpec,
    OptimizerConfig,
    ParallelConfig,
    Plan,
    PlanProvenance,
    SolverInfo,
    TrainingSpec,
)

BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="bash not installed")
AWKWARD_PATH = '/shared/plans/my plan\'s "best" $HOME `id`.json'


def make_plan(model: str, world: int, training: TrainingSpec | None = None, **degrees: Any) -> Plan:
    per_node = min(world, 8)  # dgx-h100: 8 GPUs per node
    return Plan(
        model=ModelRef(name=model, source="catalog"),
        cluster=ClusterRef(name="dgx-h100", source="bundled"),
        num_nodes=world // per_node,
        num_gpus_per_node=per_node,
        num_gpus=world,
        training=training or TrainingSpec(seq_len=4096, global_batch=256),
        parallel=ParallelConfig.for_world(world, **degrees),
        provenance=PlanProvenance(moeplan_version="0.1.0"),
    )


def mixtral_plan(**extra: Any) -> Plan:
    return make_plan("mixtral-8x7b", 16, tp=2, pp=2, ep=4, vpp=2, **extra)


def deepseek_plan(**extra: Any) -> Plan:
    return make_plan(
        "deepseek-v3",
        512,
        TrainingSpec(seq_len=4096, global_batch=1024, precision="fp8"),
        pp=8,
        ep=64,
        dispatcher=DispatcherSpec(kind="hierarchical", backend="deepep"),
        layers_per_stage=(7, 8, 8, 8, 8, 8, 8, 6),
        **extra,
    )


def monta_plan() -> Plan:
    training = TrainingSpec(seq_len=8192, global_batch=16, routing="capacity", capacity_factor=1.25)
    return make_plan("2x70B", 16, training, tp=8, ep=2, recompute="full")


def tiny_plan(**extra: Any) -> Plan:
    return make_plan(
        "tiny-moe", 8, TrainingSpec(seq_len=1024, global_batch=64, routing="balanced"), ep=4, **extra
    )


def flag_values(args: list[str]) -> dict[str, list[str]]:
    """``--flag v1 v2 --switch`` -> ``{"--flag": ["v1", "v2"], "--switch": []}`` (no value starts with --)."""
    out: dict[str, list[str]] = {}
    current = ""
    for token in args:
        if token.startswith("--"):
            assert token not in out, f"{token} emitted twice"
            current, out[token] = token, []
        else:
            out[current].append(token)
    return out


def run_bash(script: str) -> list[str]:
    assert BASH is not None
    result = subprocess.run([BASH, "-c", script], capture_output=True, text=True, check=True, timeout=30)
    return result.stdout.splitlines()


# --- Megatron: exact flags -------------------------------------------------------------------------


def test_tiny_moe_megatron_args_exactly() -> None:
    assert megatron_args(tiny_plan(), load_model("tiny-moe")) == [
        *(
            "--num-layers",
            "4",
            "--hidden-size",
            "256",
            "--ffn-hidden-size",
            "512",
            "--num-attention-heads",
            "8",
        ),
        *("--group-query-attention", "--num-query-groups", "4", "--kv-channels", "32"),
        *("--normalization", "RMSNorm", "--position-embedding-type", "rope", "--disable-bias-linear"),
        *("--swiglu", "--untie-embeddings-and-output-weights", "--attention-dropout", "0.0"),
        *("--hidden-dropout", "0.0", "--seq-length", "1024"),
        *("--max-position-embeddings", "1024", "--num-experts", "8", "--moe-ffn-hidden-size", "256"),
        *("--moe-router-topk", "2", "--moe-router-score-function", "softmax"),
        *("--moe-shared-expert-intermediate-size", "256"),
        *("--moe-layer-freq", "([0]*1+[1]*3)", "--moe-grouped-gemm", "--moe-permute-fusion"),
        *("--moe-router-dtype", "fp32", "--moe-router-fusion"),
        *("--moe-token-dispatcher-type", "alltoall", "--moe-router-force-load-balancing"),
        *("--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1"),
        *(
            "--context-parallel-size",
            "1",
            "--expert-model-parallel-size",
            "4",
            "--expert-tensor-parallel-size",
            "1",
        ),
        *("--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"),
        *("--micro-batch-size", "1", "--global-batch-size", "64", "--bf16"),
    ]
    assert megatron_env(tiny_plan()) == {
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "NCCL_NVLS_ENABLE": "0",
    }


def test_mixtral_tp2_pp2_ep4_vpp2() -> None:
    flags = flag_values(megatron_args(mixtral_plan(), load_model("mixtral-8x7b")))
    expected = {
        "--tensor-model-parallel-size": ["2"],
        "--pipeline-model-parallel-size": ["2"],
        "--num-virtual-stages-per-pipeline-rank": ["2"],
        "--expert-model-parallel-size": ["4"],
        "--expert-tensor-parallel-size": ["1"],
        "--sequence-parallel": [],
        "--moe-token-dispatcher-type": ["alltoall"],
        "--num-query-groups": ["8"],
    }
    assert {flag: flags.get(flag) for flag in expected} == expected
    absent = [
        "--num-layers-per-virtual-pipeline-stage",
        "--decoder-first-pipeline-num-layers",
        "--fp8-format",
    ]
    assert not set(absent) & set(flags)
    assert megatron_env(mixtral_plan())["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"


def test_deepseek_v3_mla_flex_deepep_fp8_uneven_pipeline() -> None:
    plan = deepseek_plan()
    flags = flag_values(megatron_args(plan, load_model("deepseek-v3")))
    assert flags["--moe-token-dispatcher-type"] == ["flex"]
    assert flags["--moe-flex-dispatcher-backend"] == ["deepep"]
    assert (flags["--fp8-format"], flags["--fp8-recipe"], flags["--bf16"]) == (["e4m3"], ["blockwise"], [])
    assert flags["--moe-layer-freq"] == ["([0]*3+[1]*58)"]
    assert flags["--decoder-first-pipeline-num-layers"] == ["7"]
    assert flags["--decoder-last-pipeline-num-layers"] == ["6"]
    assert flags["--q-lora-rank"] == ["1536"] and "--multi-latent-attention" in flags
    assert flags["--moe-router-num-groups"] == ["8"] and flags["--mtp-num-layers"] == ["1"]
    assert "--group-query-attention" not in flags and "--kv-channels" not in flags
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in megatron_env(plan)


def test_2x70b_top1_capacity_full_recompute() -> None:
    flags = flag_values(megatron_args(monta_plan(), load_model("2x70B")))
    assert "--moe-router-pre-softmax" in flags
    assert flags["--moe-expert-capacity-factor"] == ["1.25"]
    assert flags["--recompute-granularity"] == ["full"]
    assert (flags["--recompute-method"], flags["--recompute-num-layers"]) == (["uniform"], ["1"])
    assert flags["--tensor-model-parallel-size"] == ["8"] and "--sequence-parallel" in flags


def test_a2a_overlap_and_its_environment() -> None:
    plan = mixtral_plan(a2a_overlap=True)
    flags = flag_values(megatron_args(plan, load_model("mixtral-8x7b")))
    assert "--overlap-moe-expert-parallel-comm" in flags and "--delay-wgrad-compute" in flags
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in megatron_env(plan)


@pytest.mark.parametrize(
    ("version", "backend", "expected"),
    [
        ("0.16", "hybridep", ["--moe-flex-dispatcher-backend", "hybridep"]),
        ("core_v0.19.0", "deepep", ["--moe-flex-dispatcher-backend", "deepep"]),
        ("0.15.3", "deepep", ["--moe-enable-deepep"]),
    ],
)
def test_hierarchical_dispatcher_by_version(version: str, backend: str, expected: list[str]) -> None:
    plan = make_plan(
        "mixtral-8x7b", 16, ep=8, dispatcher=DispatcherSpec(kind="hierarchical", backend=backend)
    )
    args = megatron_args(plan, load_model("mixtral-8x7b"), version)
    assert args[args.index("--moe-token-dispatcher-type") + 1] == "flex"
    assert " ".join(expected) in " ".join(args)


@pytest.mark.parametrize(
    ("plan", "version", "match"),
    [
        (
            make_plan("mixtral-8x7b", 16, ep=8, dispatcher=DispatcherSpec(kind="monta")),
            "0.16",
            "no Megatron-LM equivalent",
        ),
        (
            make_plan(
                "mixtral-8x7b", 16, ep=8, dispatcher=DispatcherSpec(kind="hierarchical", backend="hybridep")
            ),
            "0.15",
            "0.16 or later",
        ),
        (mixtral_plan(a2a_overlap=True), "0.13", "0.14 or later"),
        (
            make_plan("mixtral-8x7b", 16, tp=2, pp=2, ep=4, a2a_overlap=True),
            "0.16",
            r"vpp \(1\) must be above 1",
        ),
        (tiny_plan(), "0.13", "routing \\(balanced\\) needs megatron_version 0.14"),
        (
            make_plan("mixtral-8x7b", 16, tp=2, ep=8, sequence_parallel=False),
            "0.16",
            "must be on for an MoE model",
        ),
        (
            make_plan("mixtral-8x7b", 16, pp=4, vpp=2, layers_per_stage=(4, 4, 4, 4, 4, 4, 2, 6)),
            "0.12",  # --pipeline-model-parallel-layout arrived in 0.13
            "cannot be expressed",
        ),
        (make_plan("deepseek-v3", 64, pp=8, ep=8), "0.16", r"pp\*vpp \(8\) must divide num_layers \(61\)"),
        (mixtral_plan(), "0.11", "at least 0.12"),
        (mixtral_plan(), "latest", "must look like 0.16"),
    ],
)
def test_megatron_rejects_what_it_cannot_run(plan: Plan, version: str, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        megatron_args(plan, load_model(plan.model.name), version)


@pytest.mark.parametrize(
    ("pp", "vpp", "split", "first_last"),
    [(2, 1, (15, 17), ("15", "17")), (4, 1, (7, 8, 8, 9), ("7", "9")), (2, 2, (6, 10, 6, 10), ("12", "20"))],
)
def test_uneven_splits_megatron_can_place(
    pp: int, vpp: int, split: tuple[int, ...], first_last: tuple[str, str]
) -> None:
    plan = make_plan("mixtral-8x7b", 16, pp=pp, vpp=vpp, layers_per_stage=split)
    flags = flag_values(megatron_args(plan, load_model("mixtral-8x7b")))
    first, last = flags["--decoder-first-pipeline-num-layers"], flags["--decoder-last-pipeline-num-layers"]
    assert (first[0], last[0]) == first_last


def test_parse_megatron_version() -> None:
    assert parse_megatron_version("0.16") == (0, 16)
    assert parse_megatron_version("core_r0.12.0") == (0, 12)
    assert parse_megatron_version(" 0.19.0rc1 ") == (0, 19)


@needs_bash
def test_megatron_snippet_is_valid_bash_and_keeps_every_argument() -> None:
    plan, model = deepseek_plan(), load_model("deepseek-v3")
    snippet = emit_megatron(plan, model)
    subprocess.run([BASH or "bash", "-n", "-c", snippet], check=True)
    lines = run_bash(snippet + 'printf "%s\\n" "$PYTORCH_CUDA_ALLOC_CONF" "${MEGATRON_ARGS[@]}"\n')
    assert lines == ["expandable_segments:True", *megatron_args(plan, model)]


# --- Megatron: megatron-core's own TransformerConfig accepts the flags -----------------------------

# Flag -> TransformerConfig field, where the name is not the flag's (``--foo-bar`` -> ``foo_bar``).
RENAMED_FIELDS = {
    "--num-experts": "num_moe_experts",
    "--num-virtual-stages-per-pipeline-rank": "virtual_pipeline_model_parallel_size",
    "--decoder-first-pipeline-num-layers": "num_layers_in_first_pipeline_stage",
    "--decoder-last-pipeline-num-layers": "num_layers_in_last_pipeline_stage",
    "--fp8-format": "fp8",  # argparse dest is ``fp8``
    "--norm-epsilon": "layernorm_epsilon",
}
# Flags Megatron-LM turns into fields of another name or into several fields.
EXPANDED_FIELDS: dict[str, dict[str, Any]] = {
    "--disable-bias-linear": {"add_bias_linear": False},
    "--group-query-attention": {},  # only makes Megatron-LM read --num-query-groups
    "--fp8-param-gather": {"fp8_param": True},  # and the DDP config's fp8_param_gather, checked below
    "--no-rope-fusion": {"apply_rope_fusion": False},  # store_false of apply_rope_fusion
}
BF16_STATE = OptimizerConfig(main_grads_dtype="bf16", precision_aware=True, exp_avg_dtype="bf16")
OPTIMIZER_FIELDS = {
    "--use-precision-aware-optimizer": "use_precision_aware_optimizer",
    "--main-grads-dtype": "main_grads_dtype",
    "--exp-avg-dtype": "exp_avg_dtype",
    "--exp-avg-sq-dtype": "exp_avg_sq_dtype",
    "--optimizer-cpu-offload": "optimizer_cpu_offload",
    "--optimizer-offload-fraction": "optimizer_offload_fraction",
    "--overlap-cpu-optimizer-d2h-h2d": "overlap_cpu_optimizer_d2h_h2d",
}
"""Model-state flags: megatron-core ``OptimizerConfig`` fields."""
# Flags read outside TransformerConfig: GPTModel, the data loader, DDP, the optimizer, the micro-batch calculator.
OTHER_CONFIGS = {
    "--position-embedding-type",
    "--rotary-base",  # GPTModel's rotary_base
    "--untie-embeddings-and-output-weights",
    "--seq-length",
    "--max-position-embeddings",
    "--micro-batch-size",
    "--global-batch-size",
    "--use-distributed-optimizer",
    "--overlap-grad-reduce",
    "--overlap-param-gather",
    "--use-megatron-fsdp",
    "--data-parallel-sharding-strategy",
    "--grad-reduce-in-bf16",
    "--megatron-fsdp-main-grads-dtype",
    "--reuse-grad-buf-for-mxfp8-param-ag",
    "--no-check-for-nan-in-loss-and-grad",
    *OPTIMIZER_FIELDS,
}
# Warnings megatron-core 0.16.1 gives whatever we emit (its own defaults) or for deprecated 0.15 flags.
BENIGN_WARNINGS = (
    "full scope is deprecated",
    "moe_enable_deepep is deprecated",
    "If you are using transformer_engine",
    "apply_rope_fusion for multi-latent attention only supports training",  # Megatron-LM's default, YaRN MLA
)


def _megatron_pattern(text: str) -> Any:
    """Megatron-LM's ``--moe-layer-freq`` parser (arguments.py ``_eval_pattern``)."""
    assert not re.search(r"[^,\d\[\]\(\)\+\*]", text), text
    return eval(text)


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def transformer_config_kwargs(args: list[str], torch: ModuleType) -> dict[str, Any]:
    """What Megatron-LM's ``core_transformer_config_from_args`` passes for the flags we emit."""
    kwargs: dict[str, Any] = {}
    for flag, values in flag_values(args).items():
        if flag in OTHER_CONFIGS:
            continue
        if flag == "--swiglu":
            kwargs |= {"gated_linear_unit": True, "activation_func": torch.nn.functional.silu}
        elif flag == "--bf16":  # Megatron-LM: params_dtype = bf16, pipeline_dtype = params_dtype
            kwargs |= {"bf16": True, "params_dtype": torch.bfloat16, "pipeline_dtype": torch.bfloat16}
        elif flag in EXPANDED_FIELDS:
            kwargs |= EXPANDED_FIELDS[flag]
        elif flag == "--moe-layer-freq":
            kwargs["moe_layer_freq"] = _megatron_pattern(values[0])
        elif flag in ("--recompute-modules", "--cuda-graph-scope"):
            kwargs[flag.removeprefix("--").replace("-", "_")] = list(values)
        else:
            name = RENAMED_FIELDS.get(flag, flag.removeprefix("--").replace("-", "_"))
            kwargs[name] = _number(values[0]) if values else True
    if kwargs.get("multi_latent_attention"):
        kwargs.setdefault("q_lora_rank", None)  # Megatron-LM's --q-lora-rank default
    # Megatron-LM's command line fuses RoPE unless told not to (--no-rope-fusion, arguments.py:2045 at
    # core_v0.16.1), where the dataclass's own default is False: without this the check misses MLA's rule.
    kwargs.setdefault("apply_rope_fusion", True)
    return kwargs


@pytest.fixture(scope="module")
def megatron_core() -> dict[str, ModuleType]:
    modules = {
        "torch": "torch",
        "tc": "megatron.core.transformer.transformer_config",
        "moe_utils": "megatron.core.transformer.moe.moe_utils",
        "rope_utils": "megatron.core.models.common.embeddings.rope_utils",
        "ddp": "megatron.core.distributed.distributed_data_parallel_config",
        "mbc": "megatron.core.num_microbatches_calculator",
        "ps": "megatron.core.parallel_state",
        "optimizer": "megatron.core.optimizer.optimizer_config",
    }
    with warnings.catch_warnings():  # importing megatron.core warns that TE and Apex are absent
        warnings.simplefilter("ignore")
        return {key: pytest.importorskip(name) for key, name in modules.items()}


EXAMPLE_PLANS = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.plan.json"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "plan",
    [
        *[load_plan(path) for path in EXAMPLE_PLANS],
        mixtral_plan(),
        mixtral_plan(a2a_overlap=True),
        make_plan("mixtral-8x7b", 16, tp=2, pp=2, vpp=2, ep=4, layers_per_stage=(6, 10, 6, 10)),
        make_plan("mixtral-8x7b", 16, pp=4, vpp=2, ep=4, layers_per_stage=(4, 4, 4, 4, 4, 4, 2, 6)),
        make_plan("mixtral-8x7b", 16, tp=2, ep=8, optimizer=BF16_STATE),
        deepseek_plan(),
        deepseek_plan(fp8_param_gather=True),
        mixtral_plan(cuda_graphs=("attn", "moe_router", "moe_preprocess")),
        mixtral_plan(a2a_overlap=True, cuda_graphs=("attn", "moe_router")),
        deepseek_plan(cuda_graphs=("attn", "mlp", "moe_router", "moe_preprocess")),
        make_plan("qwen2-57b-a14b", 16, tp=2, ep=8),
        make_plan("moonlight-16b-a3b", 16, ep=8),
        make_plan("deepseek-v2-lite", 16, ep=8),
        make_plan("qwen3-30b-a3b", 16, tp=2, ep=8),
        monta_plan(),
        tiny_plan(),
    ],
    ids=[
        *[f"example-{path.name}" for path in EXAMPLE_PLANS],
        "mixtral-tp2-pp2-ep4-vpp2",
        "mixtral-a2a-overlap",
        "mixtral-uneven-vpp",
        "mixtral-solver-layout",
        "mixtral-bf16-gradients-and-moments",
        "deepseek-v3-pp8-ep64-deepep-fp8",
        "deepseek-v3-fp8-param-gather",
        "mixtral-te-cuda-graphs",
        "mixtral-a2a-overlap-te-cuda-graphs",
        "deepseek-v3-te-cuda-graphs-dense-and-moe",
        "qwen2-57b-shared-expert-gate-pre-softmax",
        "moonlight-sigmoid-expert-bias",
        "deepseek-v2-lite-yarn-seq-aux-loss",
        "qwen3-30b-qk-layernorm",
        "2x70B-tp8-ep2",
        "tiny-moe-ep4",
    ],
)
def test_megatron_core_accepts_the_emitted_flags(
    plan: Plan, megatron_core: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    mc = megatron_core
    # No Transformer Engine on a CPU machine; megatron-core asks for its version for FP8 MoE and for
    # permute fusion. Pretend TE 2.x is there, as on the GPU nodes the flags are meant for.
    monkeypatch.setattr(mc["tc"], "is_te_min_version", lambda *args, **kwargs: True)
    for name in ("fused_permute", "fused_permute_with_probs", "fused_sort_chunks_by_index"):
        monkeypatch.setattr(mc["moe_utils"], name, lambda *args, **kwargs: None, raising=False)
    for name in ("fused_sort_chunks_by_index_with_probs", "fused_unpermute"):
        monkeypatch.setattr(mc["moe_utils"], name, lambda *args, **kwargs: None, raising=False)
    # TE's fused RoPE kernel, which RoPE fusion asks to exist (never called here).
    monkeypatch.setattr(mc["rope_utils"], "fused_apply_rotary_pos_emb", lambda *args, **kwargs: None)
    model = load_model(plan.model.name)
    args = megatron_args(plan, model, "0.16")
    kwargs = transformer_config_kwargs(args, mc["torch"])
    config_class = (
        mc["tc"].MLATransformerConfig if kwargs.get("multi_latent_attention") else mc["tc"].TransformerConfig
    )
    fields = {field.name for field in dataclasses.fields(config_class)}
    assert set(kwargs) <= fields, f"not TransformerConfig fields: {set(kwargs) - fields}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = config_class(**kwargs)
    unexpected = [str(w.message) for w in caught if not str(w.message).startswith(BENIGN_WARNINGS)]
    assert unexpected == []
    assert config.num_layers == model.num_layers and config.expert_tensor_parallel_size == plan.parallel.etp
    if isinstance(config.moe_layer_freq, list):
        assert len(config.moe_layer_freq) == model.num_layers

    flags = flag_values(args)
    mc["ddp"].DistributedDataParallelConfig(
        use_distributed_optimizer="--use-distributed-optimizer" in flags,
        overlap_grad_reduce="--overlap-grad-reduce" in flags,
        overlap_param_gather="--overlap-param-gather" in flags,
        grad_reduce_in_fp32="--grad-reduce-in-bf16" not in flags,
        fp8_param_gather="--fp8-param-gather" in flags,
        reuse_grad_buf_for_mxfp8_param_ag="--reuse-grad-buf-for-mxfp8-param-ag" in flags,
    )
    # The model-state flags are megatron-core OptimizerConfig fields (as Megatron-LM's arguments map them).
    dtypes = {"bf16": mc["torch"].bfloat16, "fp32": mc["torch"].float32}
    optimizer = {
        OPTIMIZER_FIELDS[flag]: (dtypes.get(values[0], _number(values[0])) if values else True)
        for flag, values in flags.items()
        if flag in OPTIMIZER_FIELDS
    }
    known = {field.name for field in dataclasses.fields(mc["optimizer"].OptimizerConfig)}
    assert set(optimizer) <= known, set(optimizer) - known
    if optimizer.get("optimizer_cpu_offload") or not optimizer.get("use_precision_aware_optimizer"):
        # (The precision-aware optimizer on the GPU asks for Transformer Engine's FusedAdam at construction.)
        monkeypatch.setattr(mc["optimizer"], "is_te_min_version", lambda *args, **kwargs: True)
        built = mc["optimizer"].OptimizerConfig(
            bf16=True, use_distributed_optimizer="--use-distributed-optimizer" in flags, **optimizer
        )
        assert built.optimizer_offload_fraction == optimizer.get("optimizer_offload_fraction", 0.0)
    p = plan.parallel
    dense_dp, rest = divmod(plan.num_gpus, p.tp * p.cp * p.pp)
    expert_dp, expert_rest = divmod(plan.num_gpus, p.etp * p.ep * p.pp)
    assert rest == expert_rest == 0 and (dense_dp, expert_dp) == (p.dp, p.edp)
    calculator = mc["mbc"].ConstantNumMicroBatchesCalculator(
        int(flags["--global-batch-size"][0]), int(flags["--micro-batch-size"][0]), dense_dp, False, 0
    )
    assert calculator.get() == plan.training.global_batch // (p.micro_batch * p.dp)
    order = "tp-cp-ep-dp-pp"  # megatron/training/initialize.py default
    dense = mc["ps"].RankGenerator(tp=p.tp, ep=1, dp=dense_dp, pp=p.pp, cp=p.cp, order=order)
    expert = mc["ps"].RankGenerator(tp=p.etp, ep=p.ep, dp=expert_dp, pp=p.pp, cp=1, order=order)
    assert dense.get_ranks("pp") == expert.get_ranks("pp")  # ecosystem.md §1.5 rule 5


# --- Plan JSON -------------------------------------------------------------------------------------


def full_plan() -> Plan:
    estimate = Estimate(
        step_time_s=4.588123456789,
        tokens_per_s_per_gpu=7141.25,
        model_tflops_per_gpu=569.0,
        mfu=0.575,
        peak_memory_bytes=60123456789.0,
        fits=True,
        breakdown=(CostTerm(name="gemm", total_s=3.30631234, exposed_s=3.30631234),),
        bytes_per_link_class={"intra_node": 1.5e9, "inter_node": 2.25e8},
    )
    solver = SolverInfo(status="optimal", optimal=True, gap=1e-4, solve_time_s=0.8123456789, candidates=311)
    return mixtral_plan().model_copy(update={"estimate": estimate, "solver": solver})


def test_plan_json_round_trips_and_is_canonical(tmp_path: Path) -> None:
    plan = full_plan()
    text = emit_plan_json(plan)
    assert text == emit_plan_json(plan) and text.endswith("}\n") and text.isascii()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    path = tmp_path / "plan.json"
    write_plan(path, plan)
    assert path.read_text(encoding="utf-8") == text
    # Every value but the wall-clock solve time, which no plan file holds (same inputs, same bytes).
    assert json.loads(text)["solver"]["solve_time_s"] == 0.0
    assert load_plan(path) == plan.model_copy(
        update={"solver": plan.solver.model_copy(update={"solve_time_s": 0.0})}
    )
    assert emit_plan_json(load_plan(path)) == text


def test_stable_plan_json_zeroes_wall_clock_and_rounds(tmp_path: Path) -> None:
    stable = emit_plan_json(full_plan(), stable=True)
    document = json.loads(stable)
    assert document["solver"]["solve_time_s"] == 0.0
    assert document["estimate"]["step_time_s"] == 4.58812
    assert document["estimate"]["peak_memory_bytes"] == 60123500000.0
    assert document["solver"]["candidates"] == 311 and document["num_gpus"] == 16
    slower = full_plan().model_copy(
        update={
            "solver": SolverInfo(status="optimal", optimal=True, gap=1e-4, solve_time_s=9.5, candidates=311)
        }
    )
    assert emit_plan_json(slower, stable=True) == stable
    path = tmp_path / "golden.json"
    path.write_text(stable, encoding="utf-8")
    assert emit_plan_json(load_plan(path), stable=True) == stable


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a mapping"),
        ('{"model": "x"}', "field `cluster` is required but missing"),
    ],
)
def test_load_plan_bad_input_is_one_paragraph(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "plan.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SpecError, match=match) as info:
        load_plan(path)
    assert "\n" not in str(info.value)


def test_load_plan_names_a_misspelt_field(tmp_path: Path) -> None:
    document = json.loads(emit_plan_json(mixtral_plan()))
    document["parallel"]["tpp"] = 2
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(SpecError, match=r"parallel\.tpp.*did you mean `tp`"):
        load_plan(path)
    with pytest.raises(SpecError, match="does not exist"):
        load_plan(tmp_path / "missing.json")


# --- torchtitan ------------------------------------------------------------------------------------
# What torchtitan itself makes of the overrides (its ConfigManager, its device mesh) is checked in
# test_emit_torchtitan.py, where torchtitan is installed.


def titan(plan: Plan) -> Plan:
    """``plan`` as ``solve --framework torchtitan`` prices it: data-parallel state sharded by FSDP2, and its
    own router (no Transformer Engine router fusion)."""
    torchtitan = {"dp_sharding": "fsdp2", "moe_router_fusion": False}
    return plan.model_copy(update={"parallel": plan.parallel.model_copy(update=torchtitan)})


def torchtitan_arrays(text: str) -> tuple[list[str], str]:
    """``TORCHTITAN_ARGS`` and ``TORCHTITAN_AC`` as bash reads the snippet."""
    lines = run_bash(
        "set -u; TORCHTITAN_MODULE=m TORCHTITAN_CONFIG=c\n"
        + text
        + '\nprintf "%s\\n" "$TORCHTITAN_AC" "${TORCHTITAN_ARGS[@]}"'
    )
    return lines[1:], lines[0]


@needs_bash
@pytest.mark.parametrize(
    ("plan", "model_name"),
    [
        (titan(mixtral_plan()), "mixtral-8x7b"),
        (titan(deepseek_plan()), "deepseek-v3"),
        (titan(tiny_plan()), "tiny-moe"),
        (
            titan(monta_plan().model_copy(update={"training": TrainingSpec(seq_len=8192, global_batch=16)})),
            "2x70B",
        ),
    ],
)
def test_torchtitan_snippet_is_bash_and_meets_its_mesh_rules(plan: Plan, model_name: str) -> None:
    model = load_model(model_name)
    text = emit_torchtitan(plan, model)
    assert text.startswith("# torchtitan 0.3.0")
    args, subcommand = torchtitan_arrays(text)
    launch = torchtitan_config(plan, model)
    assert args == launch.args() and subcommand == f"activation_checkpoint:{plan.parallel.recompute}"
    flags = flag_values(args)
    one = lambda name: int(flags[f"--parallelism.{name}"][0])  # noqa: E731
    rep, shard, cp, tp, pp, ep = (
        one("data_parallel_replicate_degree"),
        one("data_parallel_shard_degree"),
        one("context_parallel_degree"),
        one("tensor_parallel_degree"),
        one("pipeline_parallel_degree"),
        one("expert_parallel_degree"),
    )
    assert rep * shard * cp * tp * pp == plan.num_gpus
    assert (shard * cp * tp) % ep == 0
    local, global_ = (
        int(flags["--training.local_batch_size"][0]),
        int(flags["--training.global_batch_size"][0]),
    )
    assert global_ % (local * rep * shard) == 0
    assert "--training.disable-cuda-graphs" in flags
    if pp > 1:
        parts = [part.split(",") for part in flags["--parallelism.module_fqns_per_model_part"]]
        assert len(parts) == pp * plan.parallel.vpp
        names = [name for part in parts for name in part]
        assert names == [
            "tok_embeddings",
            *(f"layers.{i}" for i in range(model.num_layers)),
            "norm",
            "lm_head",
        ]
        assert local % int(flags["--parallelism.pipeline_parallel_microbatch_size"][0]) == 0


def test_torchtitan_exact_mixtral_overrides() -> None:
    launch = torchtitan_config(titan(mixtral_plan()), load_model("mixtral-8x7b"))
    overrides = dict(launch.overrides)
    parts = overrides.pop("parallelism.module_fqns_per_model_part")
    assert isinstance(parts, list) and [len(part) for part in parts] == [9, 8, 8, 10]
    assert overrides == {
        "parallelism.data_parallel_replicate_degree": 1,
        "parallelism.data_parallel_shard_degree": 4,
        "parallelism.fsdp_reshard_after_forward": "never",
        "parallelism.tensor_parallel_degree": 2,
        "parallelism.enable_sequence_parallel": True,
        "parallelism.context_parallel_degree": 1,
        "parallelism.pipeline_parallel_degree": 2,
        "parallelism.expert_parallel_degree": 4,
        "parallelism.pipeline_parallel_schedule": "Interleaved1F1B",
        "parallelism.pipeline_parallel_microbatch_size": 1,
        "training.local_batch_size": 64,
        "training.global_batch_size": 256,
        "training.seq_len": 4096,
        "training.disable_cuda_graphs": True,
    }
    assert launch.activation_checkpoint == "none" and launch.shipped is None


@needs_bash
def test_torchtitan_names_the_shipped_config_or_asks_for_the_users() -> None:
    shipped = emit_torchtitan(titan(deepseek_plan()), load_model("deepseek-v3"))
    assert "TORCHTITAN_MODULE=deepseek_v3\nTORCHTITAN_CONFIG=deepseek_v3_671b\n" in shipped
    # DeepEP, FP8 and MTP are the config function's to build: said, not dropped.
    assert 'moe_comm_backend="deepep"' in shipped and "float8" in shipped and "num_mtp_layers=1" in shipped
    own = emit_torchtitan(titan(mixtral_plan()), load_model("mixtral-8x7b"))
    assert BASH is not None
    unset = subprocess.run([BASH, "-c", own], capture_output=True, text=True, timeout=30)
    assert unset.returncode != 0 and "ships no config function for this model" in unset.stderr
    assert run_bash(
        "TORCHTITAN_MODULE=my.mod TORCHTITAN_CONFIG=mine\n" + own + '\necho "$TORCHTITAN_CONFIG"'
    ) == ["mine"]


def test_torchtitan_balanced_routing_is_a_flag() -> None:
    launch = torchtitan_config(titan(tiny_plan()), load_model("tiny-moe"))
    assert "--debug.moe-force-load-balance" in launch.args()


@pytest.mark.parametrize(
    ("plan", "match"),
    [
        (
            make_plan("mixtral-8x7b", 16, ep=8, distributed_optimizer=False, moe_router_fusion=False),
            "EP cannot borrow",
        ),
        (titan(make_plan("mixtral-8x7b", 16, tp=4, etp=2, ep=2)), r"etp \(2\) must be 1 with ep above 1"),
        (
            titan(make_plan("mixtral-8x7b", 16, tp=4, etp=1, ep=1)),
            r"etp \(1\) must equal tp \(4\) without EP",
        ),
        # Priced as Megatron's distributed optimizer: not what torchtitan's FSDP2 keeps.
        (
            mixtral_plan(moe_router_fusion=False),
            r"dp_sharding \(megatron\) is not how torchtitan shards.*--framework torchtitan",
        ),
        (
            mixtral_plan(dp_sharding="fsdp2", moe_router_fusion=True),
            r"moe_router_fusion \(True\) has no torchtitan equivalent",
        ),
        (
            make_plan("mixtral-8x7b", 16, ep=8, dispatcher=DispatcherSpec(kind="monta")),
            "no torchtitan equivalent",
        ),
        (
            make_plan(
                "mixtral-8x7b", 16, ep=8, dispatcher=DispatcherSpec(kind="hierarchical", backend="hybridep")
            ),
            "no torchtitan equivalent",
        ),
        (
            make_plan("mixtral-8x7b", 16, ep=8, dispatcher=DispatcherSpec(kind="allgather")),
            "no torchtitan equivalent",
        ),
        (mixtral_plan(a2a_overlap=True), "a2a_overlap"),
        (titan(monta_plan()), "dropless"),
        # Megatron's model-state settings: refused, not dropped from the command line.
        (
            titan(make_plan("mixtral-8x7b", 16, ep=8, optimizer=BF16_STATE)),
            r"optimizer\.main_grads_dtype \(bf16\)",
        ),
        (
            titan(
                make_plan(
                    "mixtral-8x7b",
                    16,
                    ep=8,
                    optimizer=OptimizerConfig(precision_aware=True, offload_fraction=1),
                )
            ),
            r"optimizer\.precision_aware \(True\) has no torchtitan equivalent",
        ),
    ],
)
def test_torchtitan_rejects_inexpressible_plans(plan: Plan, match: str) -> None:
    with pytest.raises(SpecError, match=match) as info:
        emit_torchtitan(plan, load_model(plan.model.name))
    assert "torchtitan 0.3.0" in str(info.value)


# --- torchrun and Slurm ----------------------------------------------------------------------------


@needs_bash
def test_torchrun_command_survives_the_shell() -> None:
    script = emit_torchrun(mixtral_plan(), plan_path=AWKWARD_PATH)
    subprocess.run([BASH or "bash", "-n", "-c", script], check=True)
    argv = run_bash('torchrun() { printf "%s\\n" "$@"; }\nMASTER_ADDR=node-0\n' + script)
    assert argv == [
        *("--nnodes", "2", "--nproc-per-node", "8", "--rdzv-backend", "c10d"),
        *("--rdzv-endpoint", "node-0:29500", "--rdzv-id", "moeplan"),
        *("-m", "planner", "run", "--plan", AWKWARD_PATH),
    ]
    command = script[script.index("torchrun") :].replace("\\\n", " ")
    assert shlex.split(command)[-1] == AWKWARD_PATH


def test_torchrun_quotes_a_literal_master_address() -> None:
    script = emit_torchrun(tiny_plan(), plan_path="p.json", master_addr="10.0.0.1", master_port=1234)
    assert "--rdzv-endpoint 10.0.0.1:1234" in script
    script = emit_torchrun(tiny_plan(), plan_path="p.json", master_addr="a b;rm")
    assert "--rdzv-endpoint 'a b;rm:29500'" in script


@needs_bash
def test_slurm_script_parses_and_runs_with_stubbed_slurm() -> None:
    options = SlurmOptions(partition="gpu", account="proj-42", cpus_per_task=96, error="logs/%x-%j.err")
    script = emit_slurm(mixtral_plan(), plan_path=AWKWARD_PATH, options=options)
    subprocess.run([BASH or "bash", "-n", "-c", script], check=True)
    directives = [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH")]
    assert directives == [
        "--job-name=moeplan",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--cpus-per-task=96",
        "--exclusive",
        "--mem=0",
        "--time=01:00:00",
        "--partition=gpu",
        "--account=proj-42",
        "--output=%x-%j.out",
        "--error=logs/%x-%j.err",
    ]
    stubs = (
        "scontrol() { printf 'node-a\\nnode-b\\n'; }\n"
        'srun() { printf "%s\\n" "$@"; printf "%s\\n" "$PYTORCH_CUDA_ALLOC_CONF"; }\n'
        "SLURM_JOB_NODELIST='node-[a-b]'\nSLURM_JOB_ID=4242\n"
    )
    assert run_bash(stubs + script) == [
        *("--nodes=2", "--ntasks-per-node=1", "torchrun", "--nnodes", "2", "--nproc-per-node", "8"),
        *("--rdzv-backend", "c10d", "--rdzv-endpoint", "node-a:29500", "--rdzv-id", "4242"),
        *("-m", "planner", "run", "--plan", AWKWARD_PATH, "expandable_segments:True"),
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"job_name": "my job"}, "job_name"),
        ({"time": "one hour"}, "must be a Slurm time"),
        ({"partition": "gpu;reboot"}, "partition"),
        ({"account": "a b"}, "account"),
        ({"output": "out $(reboot)"}, "output"),
        ({"master_port": 70000}, "TCP port"),
        ({"launch": "megatron"}, "needs the plan's megatron arguments"),
        ({"launch": "torchtitan"}, "needs the plan's torchtitan arguments"),
    ],
)
def test_slurm_rejects_bad_options(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        emit_slurm(mixtral_plan(), plan_path="p.json", options=SlurmOptions(**kwargs))


def srun_argv(script: str, setup: str) -> list[str]:
    """What the Slurm script hands srun, with scontrol and srun stubbed and ``setup`` run first; the
    script must also parse (bash -n)."""
    subprocess.run([BASH or "bash", "-n", "-c", script], check=True)
    stubs = (
        "scontrol() { printf 'node-a\\nnode-b\\n'; }\n"
        'srun() { printf "%s\\n" "$@"; }\n'
        "SLURM_JOB_NODELIST='node-[a-b]'\nSLURM_JOB_ID=7\n"
    )
    return run_bash(f"{stubs}{setup}\n{script}")


@needs_bash
def test_slurm_launches_megatron_with_the_plans_arguments() -> None:
    plan, model = mixtral_plan(), load_model("mixtral-8x7b")
    script = emit_slurm(
        plan,
        plan_path="p.json",
        options=SlurmOptions(launch="megatron"),
        framework_snippet=emit_megatron(plan, model),
    )
    argv = srun_argv(script, "MEGATRON_LM=/opt/Megatron-LM\nset -- --data-path /data/x")
    start = argv.index("/opt/Megatron-LM/pretrain_gpt.py")
    assert argv[:3] == ["--nodes=2", "--ntasks-per-node=1", "torchrun"]
    assert argv[start + 1 :] == [*megatron_args(plan, model), "--data-path", "/data/x"]
    assert (
        subprocess.run(
            [BASH or "bash", "-c", script], capture_output=True, text=True, env={"PATH": os.environ["PATH"]}
        ).returncode
        != 0
    )  # without $MEGATRON_LM it stops before srun


@needs_bash
def test_slurm_launches_torchtitan_with_the_plans_overrides() -> None:
    plan, model = titan(deepseek_plan()), load_model("deepseek-v3")
    snippet = emit_torchtitan(plan, model)
    script = emit_slurm(
        plan, plan_path="p.json", options=SlurmOptions(launch="torchtitan"), framework_snippet=snippet
    )
    argv = srun_argv(script, "set -- --training.steps 100")
    start = argv.index("torchtitan.train")
    launch = torchtitan_config(plan, model)
    assert argv[start + 1 :] == [
        "--module", "deepseek_v3", "--config", "deepseek_v3_671b",
        *launch.args(), "--training.steps", "100", launch.subcommand,
    ]  # fmt: skip


def test_a_plan_is_whole_nodes() -> None:
    with pytest.raises(
        ValueError, match=r"num_gpus \(16\) must equal num_nodes x num_gpus_per_node \(3 x 8\)"
    ):
        Plan.model_validate(mixtral_plan().model_dump() | {"num_nodes": 3})


# --- the package -----------------------------------------------------------------------------------


def test_formats_name_every_emitter() -> None:
    assert set(FORMATS) == {"plan-json", "megatron", "torchtitan", "torchrun", "slurm"}


def test_emitters_import_neither_torch_nor_rich() -> None:
    code = "import sys, planner.emit; print(' '.join(sys.modules))"
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    assert not loaded & {"torch", "rich", "megatron", "pulp", "networkx"}


def test_a_plan_for_a_dense_model_has_no_moe_flags() -> None:
    dense = ModelSpec(
        name="dense",
        num_layers=8,
        hidden_size=512,
        num_attention_heads=8,
        ffn_hidden_size=1024,
        vocab_size=1000,
    )
    plan = make_plan("dense", 8, tp=2, pp=2)
    flags = flag_values(megatron_args(plan, dense))
    assert not any(flag.startswith("--moe") or "expert" in flag for flag in flags)
    assert "--num-experts" not in flags and "--sequence-parallel" in flags


def test_megatron_expresses_any_split_with_a_layout() -> None:
    # The solver's uneven chunks (here 8 chunks of pp=4 x vpp=2) become one layout string; the layout
    # implies the virtual stages, so --num-virtual-stages-per-pipeline-rank is not emitted with it.
    plan = make_plan("mixtral-8x7b", 16, pp=4, vpp=2, layers_per_stage=(4, 4, 4, 4, 4, 4, 2, 6))
    args = megatron_args(plan, load_model("mixtral-8x7b"), "0.16")
    layout = args[args.index("--pipeline-model-parallel-layout") + 1]
    assert layout == "Etttt|tttt|tttt|tttt|tttt|tttt|tt|ttttttL"
    assert "--num-virtual-stages-per-pipeline-rank" not in args
    assert "--decoder-first-pipeline-num-layers" not in args


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("launch", ["runtime", "megatron", "torchtitan"])
def test_scripts_are_shellcheck_clean(launch: str, tmp_path: Path) -> None:
    plan, model = mixtral_plan(), load_model("mixtral-8x7b")
    if launch == "torchtitan":
        plan = titan(plan)
    snippet = emit_torchtitan(plan, model) if launch == "torchtitan" else emit_megatron(plan, model)
    scripts = {
        "slurm.sh": emit_slurm(
            plan, plan_path="/shared/plans/plan one.json", options=SlurmOptions(launch=launch),  # type: ignore[arg-type]
            framework_snippet=snippet,
        ),
        "torchrun.sh": "#!/bin/bash\n" + emit_torchrun(plan, plan_path="/shared/plans/plan one.json"),
    }  # fmt: skip
    for name, text in scripts.items():
        (tmp_path / name).write_text(text)
        subprocess.run(["shellcheck", str(tmp_path / name)], check=True)


def test_graphed_delayed_wgrad_names_its_transformer_engine_floor() -> None:
    """From core_v0.17 validate_args refuses CUDA graphs with --delay-wgrad-compute before TE 2.12: the
    snippet says so where the plan has both, and only there."""
    plan = mixtral_plan(a2a_overlap=True, cuda_graphs=("attn", "moe_router"))
    model = load_model(plan.model.name)
    assert "Transformer Engine 2.12" in emit_megatron(plan, model, "0.17")
    assert "Transformer Engine 2.12" not in emit_megatron(plan, model, "0.16")
    assert "Transformer Engine 2.12" not in emit_megatron(mixtral_plan(a2a_overlap=True), model, "0.17")


def test_delayed_wgrad_names_each_releases_transformer_engine_floor() -> None:
    """--delay-wgrad-compute asks for TE 2.8 beside --overlap-grad-reduce from core 0.15 and 2.10 with TE's CUDA
    graphs from 0.16; without the delay no floor is named."""
    model = load_model("mixtral-8x7b")
    delayed = mixtral_plan(a2a_overlap=True)
    assert "Transformer Engine 2.8 " in emit_megatron(delayed, model, "0.15")
    assert "Transformer Engine" not in emit_megatron(delayed, model, "0.14")
    graphed = mixtral_plan(a2a_overlap=True, cuda_graphs=("attn", "moe_router"))
    assert "Transformer Engine 2.10 " in emit_megatron(graphed, model, "0.16")
    inline = mixtral_plan(a2a_overlap=True, delay_wgrad_compute=False)
    assert "Transformer Engine" not in emit_megatron(inline, model, "0.19")
