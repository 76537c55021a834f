"""moeplan's memory against Megatron-LM's own estimator, run (not copied) from a Megatron-LM checkout.

Megatron-LM prints "Theoretical memory footprints" from ``megatron/training/theoretical_memory_usage.py``
(``report_theoretical_memory``). This script loads that file from the checkout you give, with a stub for
the two helpers it imports, calls it on the configuration of every case of a validation file, and prints
its figures beside moeplan's and the measured peak, in GiB:

- state: weights, gradients and optimizer (Megatron: ``compute_weight_and_optimizer_memory``);
- activations (Megatron: ``compute_activation_memory`` with SP and selective recompute, else
  ``..._without_sp``);
- allocated: moeplan's peak less its reserve, on the rank the source reports (what ``validate`` scores).

Why they differ, in short (details in ``planner/costmodel/README.md``): Megatron's estimator assumes
FP32 gradients and Adam state (6 + 12/d bytes a parameter) whatever the run uses, puts 1/pp of the layers,
the embedding and the MTP block on one "most loaded" rank, and prices activations with Korthikanti's dense
formula (the dense FFN width for MoE layers, no routed copies, no MLA heads, no recompute modules).

Usage: python benchmarks/memory_vs_megatron.py MEGATRON_LM [VALIDATION_FILE ...]
  MEGATRON_LM: a Megatron-LM checkout, or a git directory (read with git show HEAD:...).
  Default files: benchmarks/data/memory-peaks.yaml and ../shared/validation/published.yaml when present.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import subprocess
import sys
import tempfile
import types
from argparse import Namespace
from pathlib import Path

from planner.accuracy.validate import validate_suite
from planner.accuracy.validation_file import case_inputs, load_validation_file
from planner.schema import ModelSpec, ParallelConfig, TrainingSpec

ESTIMATOR = "megatron/training/theoretical_memory_usage.py"
MIB_PER_GIB = 1024.0
REPO = Path(__file__).resolve().parents[1]


def load_estimator(megatron: Path) -> types.ModuleType:
    """Megatron-LM's estimator module, read from a checkout or a git directory, its relative import stubbed."""
    path = megatron / ESTIMATOR
    if path.exists():
        source = path.read_text()
    else:
        source = subprocess.run(
            ["git", "-C", str(megatron), "show", f"HEAD:{ESTIMATOR}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    package = types.ModuleType("mlm")
    package.__path__ = []  # a package, so that ``from .utils import`` resolves
    utils = types.ModuleType("mlm.utils")
    utils.is_hybrid_model = lambda args: False  # type: ignore[attr-defined]
    utils.print_rank_0 = lambda *a, **k: None  # type: ignore[attr-defined]
    sys.modules["mlm"], sys.modules["mlm.utils"] = package, utils
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "theoretical_memory_usage.py"
        file.write_text(source)
        spec = importlib.util.spec_from_file_location("mlm.theoretical_memory_usage", file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def megatron_args(model: ModelSpec, training: TrainingSpec, p: ParallelConfig, world: int) -> Namespace:
    """The Megatron-LM arguments the estimator reads, for moeplan's model, training and layout."""
    mla = model.mla if model.attention == "mla" else None
    layer_freq: int | list[int] = 1
    if model.is_moe and model.num_dense_layers:
        layer_freq = [0] * model.num_dense_layers + [1] * model.num_moe_layers
    return Namespace(
        num_layers=model.num_layers, hidden_size=model.hidden_size, ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads, kv_channels=model.head_dim,
        group_query_attention=mla is None and model.query_groups != model.num_attention_heads,
        num_query_groups=model.query_groups, multi_latent_attention=mla is not None,
        q_lora_rank=mla.q_lora_rank if mla else None, kv_lora_rank=mla.kv_lora_rank if mla else None,
        qk_head_dim=mla.qk_head_dim if mla else None, qk_pos_emb_head_dim=mla.qk_pos_emb_head_dim if mla else None,
        v_head_dim=mla.v_head_dim if mla else None,
        num_experts=model.num_experts, moe_ffn_hidden_size=model.expert_ffn_hidden_size if model.is_moe else None,
        moe_router_topk=model.moe_router_topk or 1, moe_layer_freq=layer_freq,
        moe_shared_expert_intermediate_size=model.shared_expert_ffn_hidden_size or None, moe_latent_size=None,
        mtp_num_layers=model.mtp_num_layers or None, swiglu=model.gated_linear_unit, add_bias_linear=False,
        normalization="RMSNorm", padded_vocab_size=model.vocab_size,
        untie_embeddings_and_output_weights=model.untie_embeddings_and_output_weights,
        seq_length=training.seq_len, micro_batch_size=p.micro_batch,
        tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp if p.vpp > 1 else None,
        expert_model_parallel_size=p.ep, expert_tensor_parallel_size=p.etp,
        data_parallel_size=p.dp, world_size=world, use_distributed_optimizer=p.distributed_optimizer,
        sequence_parallel=p.sequence_parallel, recompute_granularity=None if p.recompute == "none" else p.recompute,
    )  # fmt: skip


def compare(estimator: types.ModuleType, path: Path) -> None:
    suite = load_validation_file(path)
    report = validate_suite(suite)
    print(
        f"{path}: GiB per GPU; Megatron-LM's estimator beside moeplan's (busiest rank) and the measured peak"
    )
    print(f"{'case':28s} {'state MLM':>9s} {'moeplan':>8s} {'act MLM':>8s} {'moeplan':>8s} "
          f"{'total MLM':>9s} {'alloc moeplan':>13s} {'measured':>8s}")  # fmt: skip
    for case, result in zip(suite.cases, report.cases, strict=True):
        inputs = case_inputs(suite, case)
        p, training = inputs.parallel, inputs.training
        args = megatron_args(inputs.model, training, p, inputs.num_gpus)
        micro_batches = max(1, training.global_batch // (p.micro_batch * p.dp))
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its own line
            state, act, total = estimator.report_theoretical_memory(args, num_microbatches=micro_batches)
        use = result.estimate.memory
        assert use is not None
        ours_state = (use.weights + use.gradients + use.optimizer) / 2**30
        measured = f"{case.measured.peak_memory_gib:8.2f}" if case.measured.peak_memory_gib else f"{'':8s}"
        print(f"{case.id:28s} {state / MIB_PER_GIB:9.2f} {ours_state:8.2f} {act / MIB_PER_GIB:8.2f} "
              f"{use.activations / 2**30:8.2f} {total / MIB_PER_GIB:9.2f} {result.predicted_allocated_gib:13.2f} "
              f"{measured}")  # fmt: skip


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    estimator = load_estimator(Path(sys.argv[1]))
    files = [Path(f) for f in sys.argv[2:]] or [
        f for f in (REPO / "benchmarks" / "data" / "memory-peaks.yaml", REPO.parent / "shared" / "validation" /
                    "published.yaml") if f.exists()
    ]  # fmt: skip
    for path in files:
        compare(estimator, path)
        print()


if __name__ == "__main__":
    main()
