"""moeplan's memory against Megatron-Bridge's own estimator, run (not copied) from a Megatron-Bridge checkout.

Megatron-Bridge prints "Theoretical memory footprints" from
``src/megatron/bridge/training/utils/theoretical_memory_utils.py`` (``estimate_training_memory``). This script
reads that file from the checkout (or bare git directory) you give, executes it with stubs for its two Bridge
imports (``ConfigContainer``; ``calculate_padded_vocab_size``, Megatron's padding to a multiple of
``make_vocab_size_divisible_by`` x TP, as Bridge re-exports it from ``megatron.training.vocab_utils``), builds
the config tree it reads from each case of a validation file, and prints, in GiB per GPU:

- Bridge: state (weights, gradients, Adam: its "dense" and "routed expert" components), activations
  (always computed; ``*`` where Bridge's own report would print none: it wants SP and selective recompute),
  total;
- moeplan: state and activations on its busiest rank, and the allocated peak ``validate`` scores (predicted
  peak less the reserve; ``L``: the last pipeline rank's, where the source measured that rank);
- the measured peak (``max_memory_allocated``; ``-`` where none) and each estimate's signed error against it.

Inputs mapped: TP/PP/VPP/CP/EP/ETP, uneven first/last stage, DP, micro batch, sequence length, layers, hidden,
FFN, heads, query groups, head dim, SwiGLU, tied embeddings, vocabulary (``should_pad_vocab`` on, 128 x TP,
as the runs pad it; Bridge's provider default is off), experts, top-k, expert and shared-expert widths, first
dense layers (``moe_layer_freq``), MTP layers, distributed optimizer. Set on the tree but read by nothing in
the estimator: sequence parallelism and recompute (only its report's gate), recompute modules, MLA
dimensions, main-gradient dtype, precision-aware optimizer, BF16 moments, FP32 master
(``store_param_remainders``). No input at all: optimizer CPU offload, Megatron-FSDP/FSDP2, FP8 (TE weight
cache, FP8 param gather), unfused attention, dispatcher and its buffers, routing imbalance, QKV/linear
biases, learned position table, uneven interleaved stages, the reserve.

Why they differ (moeplan's accounting: ``planner/costmodel/memory.py``; figures from memory-peaks.yaml):

- bytes a parameter: Bridge 18, or ``6 + 12/d`` with the distributed optimizer (d: DP x CP dense, TP x DP x
  CP / (EP x ETP) experts), whatever the run keeps; moeplan 2 + main grads 4 or 2 + Adam 12, or 8 with the
  precision-aware optimizer's FP32 master and BF16 moments. The Moonlight recipe (BF16 grads and moments) is
  12 B for its unsharded experts and 6 for dense in moeplan, 18 and 9 in Bridge: state 37.05 vs 24.58 GiB for
  the same ~2.6 B parameters a GPU, all of Bridge's +25-27%. With Megatron-LM's FP32 defaults (7B, Mixtral)
  the two states agree within 0.01 GiB.
- parameters: MLA is counted as MHA of heads x kv_channels (no latent projections), no router, no QK norms;
  norms are split over TP and MTP spread over the stages (moeplan: norms whole on each TP rank, MTP last).
- activations a token and layer: Bridge ``(18 + 4 FFN/H) H`` bytes, FFN the mean over dense and MoE layers
  of ``k F_e + F_s``, all divided by TP (SP assumed). moeplan counts SwiGLU's three F-wide tensors (6F bytes,
  not 4F), the k permuted token copies (2kH) and MLA's per-head Q/K/V: Moonlight's MoE layer 63.7H against
  Bridge's layer mean 40.0H, Mixtral-8x22B's 48.7H against 39.3H. Without SP (7B TP4) moeplan keeps the
  residual and norm outputs (8H) whole on each TP rank: 13.25H a rank against Bridge's 8.5H.
- recompute and attention: Bridge assumes selective recompute and has no input for modules, so the six
  Moonlight settings get one figure (5.49 GiB; moeplan 6.71 to 5.44). Unfused attention's softmax output
  (2 a s bytes a token and layer) is not in it: MLM-MLA-MOE-MEM's 48.46 GiB of moeplan activations would be
  13.49 with fused attention, and Bridge's total (10.30) is 82% under the measured peak.
- logits: Bridge ``4 s b (H + V) / TP`` at PP=1 only (1.27 GiB for Moonlight); moeplan BF16 logits and an FP32
  softmax (1.88), on the last stage at any PP.
- rank: Bridge's "most loaded" GPU adds the largest stage's state to the first stage's activations;
  Megatron-LM measures the last rank (``L``): on MLM-MIX22-REL Bridge's 46.47 GiB is +75% on that rank;
  moeplan's first rank holds 53.09, its last 25.08.

Usage: python benchmarks/memory_vs_bridge.py MEGATRON_BRIDGE [VALIDATION_FILE ...]
  MEGATRON_BRIDGE: a Megatron-Bridge checkout, or a (bare) git directory (read with git show HEAD:...).
  Default file: benchmarks/data/memory-peaks.yaml.
"""

from __future__ import annotations

import math
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from planner.accuracy.validate import validate_suite
from planner.accuracy.validation_file import case_inputs, load_validation_file, signed_error
from planner.schema import ModelSpec, ParallelConfig, TrainingSpec

ESTIMATOR = "src/megatron/bridge/training/utils/theoretical_memory_utils.py"
GIB = 2.0**30
REPO = Path(__file__).resolve().parents[1]


def _git(bridge: Path, *args: str) -> str | None:
    done = subprocess.run(["git", f"--git-dir={bridge}", *args], capture_output=True, text=True)
    if done.returncode and (bridge / ".git").exists():
        done = subprocess.run(["git", "-C", str(bridge), *args], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def padded_vocab_size(vocab: int, divisible_by: int, tp: int, logging_enabled: bool = True) -> int:
    """Megatron-LM's ``calculate_padded_vocab_size`` (training/vocab_utils.py): up to divisible_by x tp."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab / multiple) * multiple)


def load_estimator(bridge: Path) -> tuple[types.ModuleType, str]:
    """Bridge's estimator module, executed from its source with stub Bridge imports, and the commit read."""
    path = bridge / ESTIMATOR
    source = path.read_text() if path.exists() else _git(bridge, "show", f"HEAD:{ESTIMATOR}")
    if not source:
        print(
            f"error: no {ESTIMATOR} in {bridge} (neither a checkout nor a git directory with it)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    commit = (_git(bridge, "rev-parse", "HEAD") or "unknown (not a git checkout)").strip()
    stubs = {name: types.ModuleType(name) for name in (
        "megatron.bridge", "megatron.bridge.training", "megatron.bridge.training.config",
        "megatron.bridge.utils", "megatron.bridge.utils.vocab_utils")}  # fmt: skip
    stubs["megatron.bridge.training.config"].ConfigContainer = SimpleNamespace  # type: ignore[attr-defined]
    stubs["megatron.bridge.utils.vocab_utils"].calculate_padded_vocab_size = padded_vocab_size  # type: ignore[attr-defined]
    module = types.ModuleType("bridge_theoretical_memory_utils")
    module.__file__ = str(path)
    saved = {name: sys.modules.get(name) for name in [*stubs, module.__name__]}
    sys.modules.update(stubs)
    sys.modules[module.__name__] = module
    try:
        exec(compile(source, f"{bridge}:{ESTIMATOR}", "exec"), module.__dict__)
    finally:  # leave no stub behind for other importers of ``megatron``
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module, commit


def bridge_config(
    model: ModelSpec, training: TrainingSpec, p: ParallelConfig, functional: Any
) -> SimpleNamespace:
    """The ConfigContainer attributes the estimator reads (and the related ones it ignores), Bridge's names."""
    mla = model.mla if model.attention == "mla" else None
    o = p.optimizer
    first = last = None
    stages = p.layers_per_stage
    if stages and p.vpp == 1 and len(set(stages[1:-1])) <= 1 and len(set(stages)) > 1:
        first, last = stages[0], stages[-1]
    return SimpleNamespace(
        data_parallel_size=p.dp,
        model=SimpleNamespace(
            num_layers=model.num_layers, hidden_size=model.hidden_size, ffn_hidden_size=model.ffn_hidden_size,
            num_attention_heads=model.num_attention_heads, kv_channels=model.head_dim,
            num_query_groups=model.query_groups, multi_latent_attention=mla is not None,
            q_lora_rank=mla.q_lora_rank if mla else None, kv_lora_rank=mla.kv_lora_rank if mla else None,
            qk_head_dim=mla.qk_head_dim if mla else None, v_head_dim=mla.v_head_dim if mla else None,
            qk_pos_emb_head_dim=mla.qk_pos_emb_head_dim if mla else None,
            num_moe_experts=model.num_experts, moe_router_topk=model.moe_router_topk,
            moe_ffn_hidden_size=model.expert_ffn_hidden_size if model.is_moe else None,
            moe_shared_expert_intermediate_size=model.shared_expert_ffn_hidden_size or None,
            moe_layer_freq=[0] * model.num_dense_layers + [1] * model.num_moe_layers if model.is_moe else 1,
            moe_latent_size=None, mtp_num_layers=model.mtp_num_layers or None,
            gated_linear_unit=model.gated_linear_unit,
            activation_func=functional.silu if model.gated_linear_unit else functional.gelu,
            vocab_size=model.vocab_size, make_vocab_size_divisible_by=128, should_pad_vocab=True,
            share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
            seq_length=training.seq_len, tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
            virtual_pipeline_model_parallel_size=p.vpp if p.vpp > 1 else None,
            num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
            context_parallel_size=p.cp, expert_model_parallel_size=p.ep, expert_tensor_parallel_size=p.etp,
            sequence_parallel=p.sequence_parallel,
            recompute_granularity=None if p.recompute == "none" else p.recompute,
            recompute_modules=list(p.effective_recompute_modules) or None,
        ),
        optimizer=SimpleNamespace(
            optimizer="adam", use_distributed_optimizer=p.distributed_optimizer,
            use_precision_aware_optimizer=o.precision_aware, main_grads_dtype=o.main_grads_dtype,
            main_params_dtype="fp32", exp_avg_dtype=o.exp_avg_dtype, exp_avg_sq_dtype=o.exp_avg_dtype,
            store_param_remainders=o.param_remainders,
        ),
        ddp=SimpleNamespace(
            use_distributed_optimizer=p.distributed_optimizer, grad_reduce_in_fp32=o.main_grads_dtype == "fp32"
        ),
        mixed_precision=SimpleNamespace(bf16=training.precision != "fp16", fp16=training.precision == "fp16"),
        train=SimpleNamespace(micro_batch_size=p.micro_batch, global_batch_size=training.global_batch),
    )  # fmt: skip


def _cell(value: float | None, measured: float | None = None, error: bool = False) -> str:
    """A GiB figure, or with ``error`` its signed error against ``measured``; ``-`` where there is none."""
    if value is None or (error and not measured):
        return f"{'-':>8s}"
    return f"{signed_error(value, measured):+8.1%}" if error and measured else f"{value:8.2f}"


def compare(estimator: types.ModuleType, path: Path) -> None:
    suite = load_validation_file(path)
    report = validate_suite(suite)
    print(f"{path}: GiB per GPU; B: Megatron-Bridge's estimator, mp: moeplan, err: against the measured peak")
    print(f"{'case':24s} {'B state':>8s} {'B act':>8s} {'B total':>8s} {'mp state':>8s} {'mp act':>8s} "
          f"{'mp alloc':>9s} {'measured':>8s} {'B err':>8s} {'mp err':>8s}")  # fmt: skip
    scored: list[tuple[float, float]] = []
    for case, result in zip(suite.cases, report.cases, strict=True):
        inputs = case_inputs(suite, case)
        p, training = inputs.parallel, inputs.training
        config = bridge_config(inputs.model, training, p, estimator.F)
        micro_batches = max(1, training.global_batch // (p.micro_batch * p.dp))
        bridge = estimator.estimate_training_memory(config, num_microbatches=micro_batches)
        total = bridge.total_memory_bytes / GIB
        assumed = p.sequence_parallel and p.recompute == "selective"  # Bridge reports activations only then
        use = result.estimate.memory
        assert use is not None
        last = result.reported_rank_gib  # the rank validate scores, where the source measured the last one
        ours = result.predicted_allocated_gib if last is None else last
        measured = case.measured.peak_memory_gib
        if measured:
            scored.append((abs(signed_error(total, measured)), abs(signed_error(ours, measured))))
        print(f"{case.id:24s} {bridge.weight_and_optimizer_bytes / GIB:8.2f} "
              f"{bridge.activation.memory_bytes / GIB:7.2f}{' ' if assumed else '*'} {total:8.2f} "
              f"{(use.weights + use.gradients + use.optimizer) / GIB:8.2f} {use.activations / GIB:8.2f} "
              f"{ours:8.2f}{' ' if last is None else 'L'} {_cell(measured)} {_cell(total, measured, True)} "
              f"{_cell(ours, measured, True)}")  # fmt: skip
    if scored:
        print(f"mean absolute error over {len(scored)} measured peaks: Megatron-Bridge "
              f"{sum(b for b, _ in scored) / len(scored):.1%}, moeplan {sum(m for _, m in scored) / len(scored):.1%}")  # fmt: skip


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    estimator, commit = load_estimator(Path(sys.argv[1]))
    print(f"Megatron-Bridge {commit}: {ESTIMATOR}")
    files = [Path(f) for f in sys.argv[2:]] or [REPO / "benchmarks" / "data" / "memory-peaks.yaml"]
    for path in files:
        compare(estimator, path)
        print()


if __name__ == "__main__":
    main()
