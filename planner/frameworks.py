"""What each training framework can express: the space ``moeplan solve --framework`` searches.

A plan is launched by one framework, so the search offers only what that framework runs
(``../shared/reference/ecosystem.md`` §1 for Megatron-LM, §2 for torchtitan; the bundled runtime's
limits are ``planner.workflows.run_request.RUNTIME_LIMITS``):

- ``megatron`` (Megatron-LM / Megatron-Core, the default): Megatron's own rules (``feasibility``'s
  ``megatron_only`` ones too: sequence parallelism with TP under MoE, so no MoNTA); dispatchers with a
  ``--moe-token-dispatcher-type``; no model-altering technique (TA-MoE, condensation, sequence migration
  have no Megatron flag); the only one with Transformer Engine's TP communication overlap;
- ``torchtitan`` (0.3.0): TP always shards the sequence; experts are whole under EP (etp 1) and sharded
  over the dense TP ranks without it (etp = tp), and EP borrows ranks from FSDP, CP and TP, never from
  plain (replicated) data parallelism (``torchtitan/distributed/parallel_dims.py``,
  ``models/common/moe_sharding.py``); the EP all-to-all moeplan emits for it is ``standard`` or ``deepep``
  (no all-gather dispatcher; Hybrid-EP is not priced for it); no EP overlap (DualPipeV only), no capacity
  routing, no model-altering technique; mixed precision is bfloat16 (no fp16);
- ``moeplan`` (the bundled runtime, ``moeplan run``): any dispatcher kind, model-altering techniques,
  TP without sequence parallelism; it keeps every activation (no recompute), replicates optimizer state
  (no distributed optimizer), overlaps nothing, and runs its own dispatch kernels (no kernel library).

torchtitan shards data-parallel state with PyTorch's FSDP2 (``dp_sharding: fsdp2``), which keeps other
bytes than Megatron-Core's distributed optimizer, so its plans are priced as FSDP2 and a plan priced for
one is refused by the other. Only Megatron expresses the model-state settings of ``OptimizerConfig`` (BF16 gradients or moments,
``--use-precision-aware-optimizer``, ``--optimizer-cpu-offload``).

``rules`` gives the broken ones as Violations; ``restrict`` narrows the search's choices to match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from planner.costmodel.dispatchers import dispatcher
from planner.feasibility import Violation
from planner.schema import ModelSpec, ParallelConfig, TrainingSpec

__all__ = [
    "FRAMEWORKS",
    "MODEL_ALTERING",
    "Framework",
    "FrameworkName",
    "framework",
    "techniques",
    "torchtitan_dp_degrees",
]

FrameworkName = Literal["megatron", "torchtitan", "moeplan"]

MODEL_ALTERING: dict[str, tuple[str, str]] = {
    "topology_aware_routing": ("TA-MoE", "--topology-aware-routing"),
    "condense_fraction": ("condensation", "--condense"),
    "sequence_migration": ("sequence migration", "--sequence-migration"),
}
"""Dispatcher options that change what the model computes (TA-MoE, Luffy): field -> (name, solve flag).
``SearchOptions`` offers them under the same field names."""


def techniques(settings: object) -> list[str]:
    """Fields of the model-altering techniques that ``settings`` (a DispatcherSpec, or the search
    options that offer them) has on."""
    return [field for field in MODEL_ALTERING if getattr(settings, field)]


@dataclass(frozen=True, slots=True)
class Framework:
    """One launch target and the settings it can express."""

    name: FrameworkName
    label: str
    megatron_rules: bool
    """Megatron-LM's own rules apply (``Violation.megatron_only``)."""
    model_altering: bool
    """TA-MoE, condensation and sequence migration can be run."""
    a2a_overlap: bool
    recompute: bool
    distributed_optimizer: bool
    kernel_libraries: bool
    """DeepEP / Hybrid-EP kernels (a hierarchical dispatcher's backend)."""
    optimizer_settings: bool
    """Megatron's model-state settings (``OptimizerConfig``): BF16 gradients or moments, the
    precision-aware optimizer, optimizer CPU offload."""
    fp8_params: bool
    """FP8 parameters gathered in FP8 (``fp8_param_gather``)."""
    unfused_attention: bool
    """Core attention without the fused kernels (``attention_backend: unfused``)."""
    cuda_graphs: bool
    """Megatron-Core's and Transformer Engine's CUDA graphs (``cuda_graphs``). torchtitan 0.3.0's own graphs
    (whole forward+backward, no pipeline, no host-synchronising EP dispatch) are not priced: its plans run
    with ``--training.disable-cuda-graphs``; the bundled runtime captures none."""
    tp_comm_overlap: bool
    """Transformer Engine's TP communication overlap (``tp_comm_overlap``). torchtitan's async TP (symmetric
    memory under torch.compile) is another mechanism, not priced, so its plans do not carry the setting."""
    moe_router_fusion: bool
    """Transformer Engine's fused MoE router (``moe_router_fusion``): a plan for a framework without it carries
    it off, and one with it on is refused there."""
    dp_sharding: Literal["megatron", "fsdp2"]
    """The library that shards data-parallel state (``ParallelConfig.dp_sharding``), and so how it is
    priced: a plan sharded by the other one is not what this framework runs."""

    def dispatcher_refusal(self, kind: str, backend: str | None) -> str | None:
        """Why this framework cannot run dispatcher ``kind`` (on ``backend``), or None."""
        family = dispatcher(kind)
        if self.name == "megatron" and family.megatron_type is None:
            return family.megatron_refusal
        if self.name == "torchtitan" and family.torchtitan_backends.get(backend) is None:
            name = f"{kind} on {backend}" if backend else kind
            return (
                f"{name} has no torchtitan equivalent: moeplan emits its EP all-to-all as standard or deepep"
            )
        return None

    def rules(self, model: ModelSpec, training: TrainingSpec, p: ParallelConfig) -> list[Violation]:
        """What ``p`` asks that this framework cannot express."""
        out, d = [], p.dispatcher
        has = f"has no {self.label} equivalent"
        if not self.model_altering:
            out += [Violation(f"dispatcher.{f}", getattr(d, f), has) for f in techniques(d)]
        if model.is_moe and p.ep > 1:
            refusal = self.dispatcher_refusal(d.kind, d.backend)
            if refusal:
                out.append(Violation("dispatcher", d.kind, refusal))
        if d.num_sms is not None and self.name != "megatron":
            # torchtitan's DeepEP runs on the library's default SMs (the count priced when none is set).
            out.append(Violation("dispatcher.num_sms", d.num_sms, has))
        if p.a2a_overlap and not self.a2a_overlap:
            out.append(Violation("a2a_overlap", True, has))
        if p.recompute != "none" and not self.recompute:
            out.append(Violation("recompute", p.recompute, f"{has}: it keeps every activation"))
        if p.distributed_optimizer and not self.distributed_optimizer:
            out.append(Violation("distributed_optimizer", True, has))
        if p.fp8_param_gather and not self.fp8_params:
            out.append(Violation("fp8_param_gather", True, has))
        if p.attention_backend == "unfused" and not self.unfused_attention:
            out.append(Violation("attention_backend", "unfused", has))
        if p.moe_router_fusion and not self.moe_router_fusion and model.is_moe:
            out.append(Violation("moe_router_fusion", True, f"{has}: set it false"))
        if p.tp_comm_overlap and not self.tp_comm_overlap:
            out.append(Violation("tp_comm_overlap", True, has))
        if p.cuda_graphs and not self.cuda_graphs:
            out.append(Violation("cuda_graphs", list(p.cuda_graphs), has))
        if (p.distributed_optimizer or p.fsdp) and p.dp_sharding != self.dp_sharding:
            rule = (
                f"is not how {self.label} shards data-parallel state ({self.dp_sharding}), and the plan's memory "
                f"was priced for {p.dp_sharding}'s: solve it with --framework {self.name}"
            )
            out.append(Violation("dp_sharding", p.dp_sharding, rule))
        if not self.optimizer_settings:
            default = type(p.optimizer)()
            for name in type(p.optimizer).model_fields:
                if getattr(p.optimizer, name) != getattr(default, name):
                    out.append(Violation(f"optimizer.{name}", getattr(p.optimizer, name), has))
        if self.name == "torchtitan":
            if p.tp > 1 and not p.sequence_parallel:
                out.append(Violation("sequence_parallel", False, "must be on with tp above 1 in torchtitan"))
            if training.precision == "fp16":
                out.append(
                    Violation("precision", "fp16", "has no torchtitan equivalent (bfloat16 or float32)")
                )
            if training.routing == "capacity" and model.is_moe:
                out.append(Violation("routing", "capacity", "has no torchtitan equivalent (dropless MoE)"))
            out += _torchtitan_expert_rules(model, p)
        return out


def torchtitan_dp_degrees(p: ParallelConfig) -> tuple[int, int]:
    """``(data_parallel_replicate_degree, data_parallel_shard_degree)``: data parallelism that shards state
    (Megatron's distributed optimizer, FSDP) is torchtitan's FSDP; plain data parallelism is its DDP."""
    return (1, p.dp) if (p.fsdp or p.distributed_optimizer) else (p.dp, 1)


def _torchtitan_expert_rules(model: ModelSpec, p: ParallelConfig) -> list[Violation]:
    """torchtitan 0.3.0's expert layout: EP borrows ranks from ``dp_shard*cp*tp`` (``efsdp = dp_shard*cp*tp
    / ep``, ``ParallelDims.build_mesh``); experts are whole under EP and TP-sharded without it."""
    if not model.is_moe:
        return []
    if p.ep > 1 and p.etp != 1:
        return [
            Violation("etp", p.etp, "must be 1 with ep above 1 in torchtitan: experts under EP are whole")
        ]
    if p.ep == 1 and p.etp != p.tp:
        return [
            Violation("etp", p.etp, f"must equal tp ({p.tp}) without EP in torchtitan: experts shard over TP")
        ]
    _, dp_shard = torchtitan_dp_degrees(p)
    borrowed = dp_shard * p.cp * p.tp
    if borrowed % p.ep:
        why = " (plain data parallelism is dp_replicate, which EP cannot borrow)" if dp_shard == 1 else ""
        rule = f"must divide dp_shard*cp*tp ({dp_shard}*{p.cp}*{p.tp}) in torchtitan: EP borrows ranks from FSDP, CP and TP"
        return [Violation("ep", p.ep, rule + why)]
    return []


FRAMEWORKS: dict[FrameworkName, Framework] = {
    "megatron": Framework(
        "megatron", "Megatron-LM", megatron_rules=True, model_altering=False, a2a_overlap=True, recompute=True,
        distributed_optimizer=True, kernel_libraries=True, optimizer_settings=True, fp8_params=True,
        unfused_attention=True, cuda_graphs=True, tp_comm_overlap=True, moe_router_fusion=True,
        dp_sharding="megatron",
    ),
    "torchtitan": Framework(
        "torchtitan", "torchtitan", megatron_rules=False, model_altering=False, a2a_overlap=False,
        recompute=True, distributed_optimizer=True, kernel_libraries=True, optimizer_settings=False,
        fp8_params=False, unfused_attention=False, cuda_graphs=False, tp_comm_overlap=False,
        moe_router_fusion=False, dp_sharding="fsdp2",
    ),
    "moeplan": Framework(
        "moeplan", "bundled-runtime", megatron_rules=False, model_altering=True, a2a_overlap=False,
        recompute=False, distributed_optimizer=False, kernel_libraries=False, optimizer_settings=False,
        fp8_params=False, unfused_attention=False, cuda_graphs=False, tp_comm_overlap=False,
        moe_router_fusion=False, dp_sharding="megatron",
    ),
}  # fmt: skip


def framework(name: str) -> Framework:
    """The framework called ``name``."""
    return FRAMEWORKS[name]  # type: ignore[index]
