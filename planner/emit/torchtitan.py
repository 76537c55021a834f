"""Plan -> torchtitan v0.2.2 TOML sections: ``[parallelism]``, ``[training]``, ``[activation_checkpoint]``.

v0.2.2 is torchtitan's last TOML-configured release (``../shared/reference/ecosystem.md`` §2.2; later
releases take Python recipes and dropped expert tensor parallelism). Merge the sections into a job TOML
that names the model, data, optimizer and steps.

Mapping:

- Dense data parallelism: Megatron's distributed optimizer becomes FSDP that keeps parameters whole
  between forward and backward (``fsdp_reshard_after_forward = "never"``: one all-gather and one
  reduce-scatter per step, as the distributed optimizer); ``fsdp`` becomes FSDP resharded after every
  forward (``"always"``: torchtitan's ``"default"`` keeps the weights gathered under pipeline parallelism,
  which is not what the plan priced); neither becomes DDP (``data_parallel_replicate_degree = dp``). The
  plan must be priced as FSDP2 (``dp_sharding: fsdp2``, what ``solve --framework torchtitan`` gives).
- EP borrows ranks from dp_shard x cp x tp (v0.2.2: ``efsdp = dp_shard*cp*tp/(etp*ep)``), never from PP
  or dp_replicate. As in Megatron's default order, TP is innermost and PP outermost.
- Pipeline: ``"1F1B"`` (vpp 1) or ``"Interleaved1F1B"``. The plan's exact split is written as
  ``module_fqns_per_model_part`` (``tok_embeddings`` first, ``norm`` and ``output`` last), since
  torchtitan's own split counts the embedding and the output as layers.
- Batch: with pp, ``local_batch_size`` is one DP rank's share of the global batch, cut into
  ``pipeline_parallel_microbatch_size`` micro-batches; without pp it is the micro-batch, and torchtitan
  accumulates gradients up to ``global_batch_size``.
- Recompute: ``selective`` -> op-level selective AC (torchtitan has no names for Megatron's modules);
  ``full`` -> ``full``.

Not expressible (SpecError naming the rule): etp other than 1 or tp, EP that does not divide
dp_shard*cp*tp/etp, dispatchers other than all-to-all and DeepEP, the EP all-to-all overlap, capacity
routing, TP without sequence parallelism.
"""

from __future__ import annotations

import json

from planner.costmodel.dispatchers import dispatcher
from planner.errors import SpecError
from planner.frameworks import framework, techniques
from planner.schema import ModelSpec, Plan

__all__ = ["TORCHTITAN_VERSION", "TomlValue", "emit_torchtitan", "torchtitan_config"]

TORCHTITAN_VERSION = "v0.2.2"
"""The torchtitan release whose TOML field names are emitted."""

TomlValue = bool | int | str | list[list[str]]


def _reject(field: str, value: object, rule: str) -> SpecError:
    return SpecError(f"{field} ({value}) {rule} (torchtitan {TORCHTITAN_VERSION}).")


def _comm_backend(plan: Plan, model: ModelSpec) -> str:
    p, d = plan.parallel, plan.parallel.dispatcher
    if techniques(d):
        raise _reject(
            "dispatcher",
            d.kind,
            "options topology_aware_routing, condense and sequence_migration have no equivalent",
        )
    if p.a2a_overlap:
        raise _reject(
            "a2a_overlap", True, "has no equivalent: the EP all-to-all overlap exists only with DualPipeV"
        )
    if plan.training.routing == "capacity" and model.is_moe:
        raise _reject("routing", "capacity", "has no equivalent: torchtitan's MoE is dropless")
    if not model.is_moe or p.ep == 1:
        return "standard"
    backend = dispatcher(d.kind).torchtitan_backends.get(d.backend)
    if backend is not None:
        return backend
    name = f"{d.kind}/{d.backend}" if d.backend else d.kind
    raise _reject(
        "dispatcher",
        name,
        "has no equivalent: expert_parallel_comm_backend is standard (all-to-all) or deepep",
    )


def _check_degrees(plan: Plan, model: ModelSpec, dp_replicate: int, dp_shard: int) -> None:
    p, world = plan.parallel, plan.num_gpus
    product = dp_replicate * dp_shard * p.cp * p.tp * p.pp
    if product != world:
        raise _reject("dp_replicate*dp_shard*cp*tp*pp", product, f"must equal num_gpus ({world})")
    if p.tp > 1 and not p.sequence_parallel:
        raise _reject(
            "sequence_parallel",
            False,
            "must be on with tp above 1: torchtitan's TP always shards the sequence",
        )
    if model.num_experts is None:
        if p.ep > 1 or p.etp > 1:
            raise _reject("ep", p.ep, f"must be 1 with etp 1: model '{model.name}' has no experts")
        return
    if p.etp not in (1, p.tp):
        raise _reject("etp", p.etp, f"must be 1 or tp ({p.tp}) (ParallelDims._validate)")
    if model.num_experts % p.ep:
        raise _reject("ep", p.ep, f"must divide num_experts ({model.num_experts})")
    borrowed = dp_shard * p.cp * p.tp
    if borrowed % (p.etp * p.ep):
        why = " (plain data parallelism is dp_replicate, which EP cannot borrow)" if dp_shard == 1 else ""
        rule = f"must divide dp_shard*cp*tp ({dp_shard}*{p.cp}*{p.tp}): EP borrows ranks from FSDP, CP and TP"
        raise _reject("etp*ep", p.etp * p.ep, rule + why)


def _check_sequence_and_batch(plan: Plan) -> None:
    p, training = plan.parallel, plan.training
    if training.seq_len % p.tp:
        raise _reject("seq_len", training.seq_len, f"must be divisible by tp ({p.tp})")
    if p.cp > 1 and training.seq_len % (2 * p.cp):
        raise _reject(
            "seq_len", training.seq_len, f"must be divisible by 2*cp ({2 * p.cp}) for load-balanced CP"
        )
    if training.global_batch % (p.micro_batch * p.dp):
        raise _reject(
            "global_batch",
            training.global_batch,
            f"must be divisible by micro_batch x dp ({p.micro_batch} x {p.dp})",
        )


def _model_parts(plan: Plan, model: ModelSpec) -> list[list[str]]:
    """Module names of each (virtual) pipeline stage, in model order (stage s runs on rank s % pp)."""
    p, layers = plan.parallel, model.num_layers
    stages = p.pp * p.vpp
    split = p.layers_per_stage
    if split is None:
        if layers % stages:
            raise _reject("pp*vpp", stages, f"must divide num_layers ({layers}) without layers_per_stage")
        split = (layers // stages,) * stages
    if len(split) != stages or sum(split) != layers:
        raise _reject("layers_per_stage", split, f"must have pp*vpp = {stages} entries summing to {layers}")
    parts, start = [], 0
    for count in split:
        parts.append([f"layers.{i}" for i in range(start, start + count)])
        start += count
    parts[0].insert(0, "tok_embeddings")
    parts[-1] += ["norm", "output"]
    return parts


def torchtitan_config(plan: Plan, model: ModelSpec) -> dict[str, dict[str, TomlValue]]:
    """The three TOML sections as tables; SpecError when torchtitan v0.2.2 cannot run the plan."""
    p, training = plan.parallel, plan.training
    sharded = p.fsdp or p.distributed_optimizer
    dp_replicate, dp_shard = (1, p.dp) if sharded else (p.dp, 1)
    backend = _comm_backend(plan, model)
    # Whatever else the plan asks that torchtitan cannot express (the search's own rule for
    # --framework torchtitan, planner.frameworks): refused, never dropped from the TOML.
    for violation in framework("torchtitan").rules(model, training, p):
        raise _reject(violation.field, violation.value, violation.rule)
    _check_degrees(plan, model, dp_replicate, dp_shard)
    _check_sequence_and_batch(plan)
    parallelism: dict[str, TomlValue] = {
        "data_parallel_replicate_degree": dp_replicate,
        "data_parallel_shard_degree": dp_shard,
        "fsdp_reshard_after_forward": "always" if p.fsdp else "never" if sharded else "default",
        "tensor_parallel_degree": p.tp,
        "context_parallel_degree": p.cp,
        "pipeline_parallel_degree": p.pp,
    }
    if p.pp > 1:
        parallelism["pipeline_parallel_schedule"] = "Interleaved1F1B" if p.vpp > 1 else "1F1B"
        parallelism["pipeline_parallel_microbatch_size"] = p.micro_batch
        parallelism["module_fqns_per_model_part"] = _model_parts(plan, model)
    parallelism |= {
        "expert_parallel_degree": p.ep,
        "expert_tensor_parallel_degree": p.etp,
        "expert_parallel_comm_backend": backend,
    }
    local_batch = training.global_batch // p.dp if p.pp > 1 else p.micro_batch
    checkpoint: dict[str, TomlValue] = {"mode": p.recompute}
    if p.recompute == "selective":
        checkpoint["selective_ac_option"] = "op"
    return {
        "parallelism": parallelism,
        "training": {
            "local_batch_size": local_batch,
            "global_batch_size": training.global_batch,
            "seq_len": training.seq_len,
        },
        "activation_checkpoint": checkpoint,
    }


def _toml_value(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    rows = ["[" + ", ".join(json.dumps(name) for name in row) + "]," for row in value]
    return "[\n" + "".join(f"    {row}\n" for row in rows) + "]"


def _notes(plan: Plan, model: ModelSpec) -> list[str]:
    notes = []
    if plan.training.precision != "bf16":
        notes.append(
            f"precision {plan.training.precision}: enable torchtitan's float8 converter in the job TOML."
        )
    if model.is_moe and not plan.parallel.grouped_gemm:
        notes.append("grouped_gemm false: build the MoE model args with use_grouped_mm = False.")
    if model.mtp_num_layers:
        notes.append(f"mtp_num_layers {model.mtp_num_layers}: torchtitan's models train no MTP module.")
    if plan.training.routing == "balanced" and model.is_moe:
        notes.append(
            "routing 'balanced': set torchtitan's moe_force_load_balance debug switch (benchmarks only)."
        )
    if plan.parallel.recompute == "selective":
        notes.append("recompute selective: op-level selective AC stands in for Megatron's module list.")
    return notes


def emit_torchtitan(plan: Plan, model: ModelSpec) -> str:
    """TOML text of the three sections, headed by the targeted torchtitan version and caveats."""
    config = torchtitan_config(plan, model)
    where = " ".join(f"{plan.model.name} on {plan.cluster.name}".split())
    lines = [
        f"# torchtitan {TORCHTITAN_VERSION} (last TOML-configured release): moeplan plan of {where}, "
        f"{plan.num_gpus} GPUs.",
        "# Merge into a job TOML that names the model, data, optimizer and steps.",
        *(f"# {note}" for note in _notes(plan, model)),
    ]
    for section, table in config.items():
        lines += ["", f"[{section}]", *(f"{key} = {_toml_value(value)}" for key, value in table.items())]
    return "\n".join(lines) + "\n"
