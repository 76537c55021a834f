"""Megatron-LM's rules a plan must meet before its flags are emitted, and the release each gated flag needs.

Rules: ``../shared/reference/ecosystem.md`` §1.5 (Megatron-LM source, file:line at ``d98e8a64``); flag
releases: §1.7 and Megatron-LM's arguments.py. A broken rule is a SpecError naming field, value and rule.
"""

from __future__ import annotations

import re

from planner.costmodel.dispatchers import dispatcher, kinds
from planner.errors import SpecError
from planner.feasibility import cuda_graph_rules
from planner.frameworks import techniques
from planner.schema import ModelSpec, Plan

__all__ = [
    "FLAG_SINCE",
    "OLDEST_MEGATRON",
    "check_megatron_rules",
    "parse_megatron_version",
    "pipeline_layout",
    "needs_layout",
    "reject",
    "require_release",
    "uneven_pipeline_split",
]

OLDEST_MEGATRON = (0, 12)
"""Oldest release whose flags ecosystem.md checked (core_r0.12.0)."""

FLAG_SINCE: dict[str, tuple[int, int]] = {
    "--moe-flex-dispatcher-backend": (0, 16),
    "--overlap-moe-expert-parallel-comm": (0, 14),
    "--moe-router-force-load-balancing": (0, 14),
    "--moe-router-fusion": (0, 14),
    "--moe-deepep-num-sms": (0, 13),
    "--moe-hybridep-num-sms": (0, 16),  # with --moe-flex-dispatcher-backend hybridep
    "--moe-flex-dispatcher-num-sms": (
        0,
        19,
    ),  # the per-backend flags deprecated into it  # TransformerConfig.moe_router_fusion, first in core_v0.14.0
    "--use-megatron-fsdp": (0, 14),
    "--exp-avg-dtype bf16": (0, 13),
    "--megatron-fsdp-main-grads-dtype": (0, 17),
    "--cuda-graph-impl": (0, 16),  # 0.15's --cuda-graph-scope has no MoE scopes (full, attn, full_iteration)
    "--cuda-graph-modules": (0, 18),
    "--rope-type": (0, 14),
    "--window-size": (0, 15),
    "--softmax-type": (0, 15),
    "--quick-geglu": (0, 15),  # with --glu-linear-offset and --activation-func-clamp-value
    "global_aux_loss": (0, 15),  # a --moe-router-load-balancing-type choice
    "--moe-shared-expert-gate": (0, 16),
    # YaRN outside multi-latent attention: --position-embedding-type yarn with --yarn-* flags, which
    # core_transformer_config_from_args carries to GPTModel's YaRN (argument_utils.py:384 at core_v0.19.0;
    # 0.18 has the choice but sets none of the config's yarn_* fields that GPTModel reads).
    "--position-embedding-type yarn": (0, 19),
}
"""First Megatron-Core release (major, minor) with each gated flag."""

_VERSION = re.compile(r"(?:core_[rv])?v?(\d+)\.(\d+)(?:\.\d+)?(?:rc\d+)?")


def parse_megatron_version(text: str) -> tuple[int, int]:
    """``"0.16"``, ``"0.16.1"``, ``"core_v0.16.0"`` -> ``(0, 16)``; SpecError below 0.12 or unreadable."""
    match = _VERSION.fullmatch(text.strip())
    if match is None:
        raise SpecError(
            f"megatron_version ({text!r}) must look like 0.16 or 0.16.1 (a Megatron-Core release)."
        )
    version = (int(match[1]), int(match[2]))
    if version < OLDEST_MEGATRON:
        raise SpecError(
            f"megatron_version ({text}) must be at least 0.12: older releases lack flags this emitter "
            "needs and were not checked."
        )
    return version


def reject(field: str, value: object, rule: str) -> SpecError:
    """The SpecError for one broken rule."""
    return SpecError(f"{field} ({value}) {rule}.")


def require_release(version: tuple[int, int], flag: str, field: str, value: object) -> None:
    """SpecError when the plan's ``field`` needs ``flag`` and ``version`` predates it."""
    major, minor = FLAG_SINCE[flag]
    if version < (major, minor):
        raise reject(field, value, f"needs megatron_version {major}.{minor} or later ({flag})")


def _check_grid(plan: Plan, model: ModelSpec) -> None:
    """Rules 1-4 and 7 of §1.5, and the batch rule of §1.4."""
    p, world = plan.parallel, plan.num_gpus
    if p.tp * p.cp * p.pp * p.dp != world:
        raise reject("tp*cp*pp*dp", p.tp * p.cp * p.pp * p.dp, f"must equal num_gpus ({world})")
    if p.etp * p.ep * p.pp * p.edp != world:
        raise reject("etp*ep*pp*edp", p.etp * p.ep * p.pp * p.edp, f"must equal num_gpus ({world})")
    if model.num_experts is None and (p.ep > 1 or p.etp > 1):
        raise reject("ep", p.ep, f"must be 1 with etp 1: model '{model.name}' has no experts")
    if model.num_experts is not None and model.num_experts % p.ep:
        raise reject("ep", p.ep, f"must divide num_experts ({model.num_experts})")
    if model.is_moe and p.tp > 1 and not p.sequence_parallel:
        raise reject(
            "sequence_parallel", False, "must be on for an MoE model with tp above 1 (MoELayer raises)"
        )
    if p.vpp > 1 and p.pp == 1:
        raise reject("vpp", p.vpp, "needs pp above 1")
    if plan.training.global_batch % (p.micro_batch * p.dp):
        rule = f"must be divisible by micro_batch x dp ({p.micro_batch} x {p.dp})"
        raise reject("global_batch", plan.training.global_batch, rule)


def _check_moe(plan: Plan, model: ModelSpec, version: tuple[int, int]) -> None:
    """Dispatcher (rule 13), EP all-to-all overlap (rule 12) and recompute-module rules."""
    p = plan.parallel
    modules = p.effective_recompute_modules
    if "mla_up_proj" in modules and model.attention != "mla":
        raise reject("recompute_modules", "mla_up_proj", "needs multi-latent attention")
    if "moe_act" in modules and not model.is_moe:
        raise reject("recompute_modules", "moe_act", "needs an MoE model (grouped GEMM)")
    if not model.is_moe:
        return
    d = p.dispatcher
    kind = dispatcher(d.kind)
    for field in techniques(d):
        raise reject(
            f"dispatcher.{field}", getattr(d, field), "has no Megatron-LM equivalent; plan without it"
        )
    if kind.megatron_type is None:
        raise reject("dispatcher.kind", d.kind, kind.megatron_refusal)
    if d.backend not in (None, kind.default_backend):  # only DeepEP before the backend flag
        require_release(version, "--moe-flex-dispatcher-backend", "dispatcher.backend", "hybridep")
    if plan.training.routing == "balanced":
        require_release(version, "--moe-router-force-load-balancing", "routing", "balanced")
    if not p.a2a_overlap:
        return
    require_release(version, "--overlap-moe-expert-parallel-comm", "a2a_overlap", True)
    rule = "with a2a_overlap (--overlap-moe-expert-parallel-comm)"
    if p.ep == 1:
        raise reject("ep", p.ep, f"must be above 1 {rule}")
    if not kind.overlappable:
        able = " or ".join(k for k in kinds() if dispatcher(k).overlappable)
        raise reject("dispatcher.kind", d.kind, f"must be {able} {rule}")
    if p.recompute == "full" or "moe" in modules:
        raise reject("recompute", p.recompute, f"must not be full, nor recompute 'moe', {rule}")
    if p.pp > 1 and p.vpp == 1:
        raise reject("vpp", p.vpp, f"must be above 1 when pp is above 1 {rule}")
    if model.mtp_num_layers > 1 or (model.mtp_num_layers == 1 and p.pp == 1):
        raise reject("mtp_num_layers", model.mtp_num_layers, f"must be 0, or 1 with pp above 1, {rule}")


def _check_optimizer(plan: Plan, version: tuple[int, int]) -> None:
    """State sharded by FSDP2 is torchtitan's (``frameworks``). The precision-aware optimizer (and so CPU
    offload) runs only under the distributed optimizer
    (megatron/core/optimizer/__init__.py: "--use-precision-aware-optimizer only supported with
    distributed optimizer"); BF16 moments are a choice of core_v0.13.0 on (arguments.py)."""
    p, o = plan.parallel, plan.parallel.optimizer
    if p.dp_sharding == "fsdp2" and (p.distributed_optimizer or p.fsdp):
        raise reject(
            "dp_sharding", "fsdp2",
            "is torchtitan's FSDP2, and the plan's memory was priced with its bytes; moeplan emits Megatron-Core's "
            "distributed optimizer or Megatron-FSDP (Megatron-LM's --use-torch-fsdp2 runs without expert or "
            "pipeline parallelism and is not priced): solve it with --framework megatron",
        )  # fmt: skip
    if o.precision_aware and not (p.distributed_optimizer or p.fsdp):
        raise reject("optimizer.precision_aware", True, "needs the distributed optimizer in Megatron-LM")
    if o.exp_avg_dtype == "bf16":
        require_release(version, "--exp-avg-dtype bf16", "optimizer.exp_avg_dtype", o.exp_avg_dtype)
    if not o.param_remainders:
        raise reject(
            "optimizer.param_remainders", False,
            "has no Megatron-LM flag: with the precision-aware optimizer under BF16, Megatron-LM keeps the "
            "master weights as 16-bit remainders (store_param_remainders)",
        )  # fmt: skip


def _check_model(model: ModelSpec, version: tuple[int, int]) -> None:
    """What the model computes that Megatron-LM's training flags cannot express (``ModelSpec``'s semantics):
    multi-latent attention's YaRN other than its fixed form (original context 4096, betas 32 and 1, rounded
    correction range: MLATransformerConfig's defaults, which no flag changes), YaRN of other attention before
    core_v0.19 (``--rope-type yarn`` is asserted MLA-only, arguments.py:1353 at core_v0.16.1;
    ``--position-embedding-type yarn`` reaches the model from 0.19, ``FLAG_SINCE``), and DBRX's QKV clamp."""
    yarn = model.yarn
    mla = model.attention == "mla" and model.mla is not None
    shown = (
        f"factor {yarn.factor:g}, original context {yarn.original_max_position_embeddings}" if yarn else ""
    )
    if (
        yarn is not None
        and mla
        and (
            (yarn.original_max_position_embeddings, yarn.beta_fast, yarn.beta_slow, yarn.truncate)
            != (4096, 32.0, 1.0, True)
        )
    ):
        raise reject(
            "yarn", shown,
            "has no Megatron-LM training flags: multi-latent attention's YaRN has original context 4096, betas "
            "32 and 1 and a rounded correction range. Write the model without yarn to train it with plain RoPE",
        )  # fmt: skip
    if yarn is not None and not mla and version < FLAG_SINCE["--position-embedding-type yarn"]:
        since = ".".join(map(str, FLAG_SINCE["--position-embedding-type yarn"]))
        raise reject(
            "yarn", shown,
            f"has no Megatron-LM training flags before megatron_version {since}: until then Megatron-LM's YaRN "
            f"is multi-latent attention's. Emit with --megatron-version {since}, or write the model without "
            "yarn to train it with plain RoPE",
        )  # fmt: skip
    if model.clip_qkv is not None:
        raise reject(
            "clip_qkv", model.clip_qkv,
            "has no Megatron-LM equivalent: DBRX clamps its QKV projection, which Megatron-LM cannot; write the "
            "model without it to train the rest",
        )  # fmt: skip


def _check_cuda_graphs(plan: Plan, model: ModelSpec, version: tuple[int, int]) -> None:
    """What Megatron-Core's CUDA graphs capture (``planner.feasibility`` rule 15), from the release whose
    ``--cuda-graph-scope`` names the MoE scopes (core_v0.16.0; 0.15 has full, attn and full_iteration)."""
    scopes = list(plan.parallel.cuda_graphs)
    if not scopes:
        return
    require_release(version, "--cuda-graph-impl", "parallel.cuda_graphs", scopes)
    for violation in cuda_graph_rules(model, plan.training, plan.parallel):
        raise reject(violation.field, violation.value, violation.rule)


def check_megatron_rules(plan: Plan, model: ModelSpec, version: tuple[int, int]) -> None:
    """Every rule above, plus the pipeline split (rule 6); SpecError on the first one broken."""
    _check_grid(plan, model)
    _check_moe(plan, model, version)
    if plan.parallel.fsdp:
        require_release(version, "--use-megatron-fsdp", "fsdp", True)
    _check_optimizer(plan, version)
    _check_model(model, version)
    _check_cuda_graphs(plan, model, version)
    if version < LAYOUT_RELEASE:
        uneven_pipeline_split(plan, model)


LAYOUT_RELEASE = (0, 13)
"""First Megatron-Core release with ``--pipeline-model-parallel-layout`` (ecosystem.md §1.7)."""


def pipeline_layout(plan: Plan, model: ModelSpec) -> str:
    """Megatron's ``--pipeline-model-parallel-layout`` for the plan's chunks, in order.

    One ``|``-separated entry per virtual stage: ``t`` per decoder layer, ``E`` (embedding) on the first,
    ``m`` per MTP layer and ``L`` (loss) on the last, as in Megatron's GB200 guide (``Et|(tt|)*30L``).
    """
    sizes = plan.parallel.layers_per_stage
    assert sizes is not None  # only called for an explicit split
    stages = ["t" * n for n in sizes]
    stages[0] = "E" + stages[0]
    stages[-1] += "m" * model.mtp_num_layers + "L"
    return "|".join(stages)


def needs_layout(plan: Plan, model: ModelSpec) -> bool:
    """True when the split is uneven and the first/last-stage flags cannot express it."""
    split = plan.parallel.layers_per_stage
    if split is None or len(set(split)) == 1:
        return False
    try:
        uneven_pipeline_split(plan, model)
    except SpecError:
        return True
    return False


def uneven_pipeline_split(plan: Plan, model: ModelSpec) -> tuple[int, int] | None:
    """Layers of the first and last pipeline rank for an uneven split, None for an even one (rule 6).

    Megatron gives every virtual stage of a rank the same number of layers, every middle rank the same
    number, and at least one layer to each; a split it cannot place is a SpecError.
    """
    p, layers = plan.parallel, model.num_layers
    stages = p.pp * p.vpp
    split = p.layers_per_stage
    if split is None:
        if layers % stages:
            raise reject("pp*vpp", stages, f"must divide num_layers ({layers}) without layers_per_stage")
        return None
    if len(split) != stages or sum(split) != layers:
        raise reject("layers_per_stage", split, f"must have pp*vpp = {stages} entries summing to {layers}")
    if len(set(split)) == 1:
        return None
    per_rank = [{split[v * p.pp + rank] for v in range(p.vpp)} for rank in range(p.pp)]
    middle: set[int] = set().union(*per_rank[1:-1])
    uniform = all(len(counts) == 1 for counts in per_rank) and len(middle) <= 1
    if not uniform or min(per_rank[0] | per_rank[-1] | middle) == 0:
        raise reject(
            "layers_per_stage",
            split,
            "cannot be expressed with --decoder-first/last-pipeline-num-layers: Megatron gives every "
            "virtual stage of a rank the same layer count, every middle rank the same count, and at "
            "least one layer to each stage",
        )
    return min(per_rank[0]) * p.vpp, min(per_rank[-1]) * p.vpp
