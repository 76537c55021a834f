"""Plan -> torchtitan 0.3.0 command-line overrides, as a bash snippet (``TORCHTITAN_ARGS`` array).

torchtitan 0.3.0 (PyPI ``torchtitan==0.3.0``) reads no TOML: ``python -m torchtitan.train --module M
--config C`` calls config function ``C`` of ``torchtitan.models.M.config_registry`` (or of a user's module),
which builds the model, data, optimizer and schedule, and ``--section.field`` flags (tyro) override its
fields (``torchtitan/config/manager.py::ConfigManager``). moeplan writes those overrides for everything the
plan decides: the mesh, the pipeline split, the batch, recompute. Where torchtitan ships a config function
that builds the plan's model (same layers, width, experts, top-k and vocabulary; ``SHIPPED_CONFIGS``,
checked against torchtitan's own configs by ``tests/unit/test_emit_torchtitan.py``), the snippet names it;
otherwise the user names theirs (``TORCHTITAN_MODULE`` / ``TORCHTITAN_CONFIG``, refused by bash if unset).

Mapping (``torchtitan/config/configs.py::ParallelismConfig``, ``distributed/parallel_dims.py``):

- Dense data parallelism: Megatron's distributed optimizer becomes FSDP that keeps parameters whole
  between forward and backward (``fsdp_reshard_after_forward never``: one all-gather and one
  reduce-scatter per step, as the distributed optimizer); ``fsdp`` becomes FSDP resharded after every
  forward (``always``: torchtitan's ``default`` keeps the weights gathered under pipeline parallelism,
  which is not what the plan priced); neither becomes DDP (``data_parallel_replicate_degree = dp``). The
  plan must be priced as FSDP2 (``dp_sharding: fsdp2``, what ``solve --framework torchtitan`` gives).
- Experts: EP borrows ranks from ``dp_shard*cp*tp`` (``efsdp = dp_shard*cp*tp/ep``), never from PP or
  ``dp_replicate``. 0.3.0 has no expert tensor parallelism of its own: under EP the experts are whole
  (etp 1); without EP they are sharded over the dense TP ranks (etp = tp) (``models/common/moe_sharding.py``).
  The EP all-to-all (``standard``, ``deepep``) is chosen when the config function builds the model
  (``model_registry(..., moe_comm_backend=...)``), not on the command line: the snippet says so.
- Pipeline: ``1F1B`` (vpp 1) or ``Interleaved1F1B``; the plan's exact split is written as
  ``module_fqns_per_model_part`` (``tok_embeddings`` first, ``norm`` and ``lm_head`` last), since
  torchtitan's own split counts the embedding and the output as layers.
- Batch: with pp, ``local_batch_size`` is one DP rank's share of the global batch, cut into
  ``pipeline_parallel_microbatch_size`` micro-batches; without pp it is the micro-batch, and torchtitan
  accumulates gradients up to ``global_batch_size``.
- CUDA graphs off (``--training.disable-cuda-graphs``): the plan is priced without them, and 0.3.0 captures
  none with pipeline parallelism or a host-synchronising EP dispatcher.
- Recompute: the ``activation_checkpoint`` subcommand, ``none``, ``full``, or ``selective`` (op-level
  selective AC: torchtitan has no names for Megatron's modules). tyro applies options after a subcommand to
  the subcommand, so it goes last (``TORCHTITAN_AC``).
- ``routing: balanced`` sets ``--debug.moe-force-load-balance`` (torchtitan's benchmark switch).

Not expressible (SpecError naming the rule): the rules of ``planner.frameworks`` for torchtitan (etp, EP
borrowing plain DP, dispatchers other than all-to-all and DeepEP, the EP all-to-all overlap, capacity
routing, TP without sequence parallelism, Megatron's optimizer settings, CUDA graphs).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from planner.costmodel.dispatchers import dispatcher
from planner.errors import SpecError
from planner.frameworks import framework, torchtitan_dp_degrees
from planner.schema import ModelSpec, Plan

__all__ = [
    "SHIPPED_CONFIGS",
    "TORCHTITAN_VERSION",
    "ShippedConfig",
    "TorchtitanLaunch",
    "emit_torchtitan",
    "torchtitan_config",
]

TORCHTITAN_VERSION = "0.3.0"
"""The torchtitan release whose configuration is emitted (PyPI ``torchtitan==0.3.0``)."""

Override = bool | int | str | list[list[str]]


@dataclass(frozen=True, slots=True)
class ShippedConfig:
    """A config function torchtitan 0.3.0 ships, and the model it builds (what a plan's model must match)."""

    module: str
    config: str
    num_layers: int
    hidden_size: int
    num_experts: int
    moe_router_topk: int
    vocab_size: int

    def builds(self, model: ModelSpec) -> bool:
        return (
            model.num_layers,
            model.hidden_size,
            model.num_experts,
            model.moe_router_topk,
            model.vocab_size,
        ) == (self.num_layers, self.hidden_size, self.num_experts, self.moe_router_topk, self.vocab_size)


SHIPPED_CONFIGS: tuple[ShippedConfig, ...] = (
    ShippedConfig("deepseek_v3", "deepseek_v3_671b", 61, 7168, 256, 8, 129280),
    ShippedConfig("deepseek_v3", "deepseek_v3_16b", 27, 2048, 64, 6, 102400),
    ShippedConfig("qwen3", "qwen3_30b_a3b", 48, 2048, 128, 8, 151936),
    ShippedConfig("gpt_oss", "gpt_oss_120b", 36, 2880, 128, 4, 201088),
)
"""torchtitan 0.3.0's config functions of catalog models (``torchtitan/models/<module>/config_registry.py``);
the figures are each function's model (``tests/unit/test_emit_torchtitan.py`` builds them and compares).
Moonlight's (``kimi_k2_7.moonlight_16b_a3b``) is left out: its module imports torchvision, so it cannot be
checked here."""


@dataclass(frozen=True, slots=True)
class TorchtitanLaunch:
    """What ``torchtitan.train`` is given: the config function (None: the user's) and its overrides."""

    shipped: ShippedConfig | None
    overrides: tuple[tuple[str, Override], ...]
    """``(section.field, value)`` in command-line order; booleans are flags."""
    activation_checkpoint: str
    """The ``activation_checkpoint`` subcommand: ``none``, ``full`` or ``selective``."""

    def flag_groups(self) -> list[list[str]]:
        """Each override as its flag and values (one line of the snippet), without the subcommand."""
        groups: list[list[str]] = []
        for name, value in self.overrides:
            section, field = name.split(".")
            if isinstance(value, bool):
                # tyro's flags for booleans are dashed: --training.disable-cuda-graphs / --training.no-...
                flag = field.replace("_", "-")
                groups.append([f"--{section}.{flag}" if value else f"--{section}.no-{flag}"])
            elif isinstance(value, list):
                groups.append([f"--{name}", *(",".join(part) for part in value)])
            else:
                groups.append([f"--{name}", str(value)])
        return groups

    def args(self) -> list[str]:
        """The override flags as command-line tokens, without the subcommand."""
        return [token for group in self.flag_groups() for token in group]

    @property
    def subcommand(self) -> str:
        return f"activation_checkpoint:{self.activation_checkpoint}"


def _reject(field: str, value: object, rule: str) -> SpecError:
    return SpecError(f"{field} ({value}) {rule} (torchtitan {TORCHTITAN_VERSION}).")


def _comm_backend(plan: Plan, model: ModelSpec) -> str:
    p, d = plan.parallel, plan.parallel.dispatcher
    if not model.is_moe or p.ep == 1:
        return "standard"
    backend = dispatcher(d.kind).torchtitan_backends.get(d.backend)
    if backend is None:  # planner.frameworks refuses it first; kept so no name is ever guessed
        raise _reject("dispatcher", d.kind, "has no equivalent")
    return backend


def _check_degrees(plan: Plan, dp_replicate: int, dp_shard: int) -> None:
    p, world = plan.parallel, plan.num_gpus
    product = dp_replicate * dp_shard * p.cp * p.tp * p.pp
    if product != world:
        raise _reject("dp_replicate*dp_shard*cp*tp*pp", product, f"must equal num_gpus ({world})")


def _check_sequence_and_batch(plan: Plan) -> None:
    p, training = plan.parallel, plan.training
    if training.seq_len % p.tp:
        raise _reject("seq_len", training.seq_len, f"must be divisible by tp ({p.tp})")
    if p.cp > 1 and training.seq_len % (2 * p.cp):
        raise _reject(
            "seq_len",
            training.seq_len,
            f"must be divisible by 2*cp ({2 * p.cp}) for head-tail load-balanced CP",
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
    parts[-1] += ["norm", "lm_head"]
    return parts


def torchtitan_config(plan: Plan, model: ModelSpec) -> TorchtitanLaunch:
    """The overrides that launch the plan; SpecError when torchtitan 0.3.0 cannot run it."""
    p, training = plan.parallel, plan.training
    # Whatever the plan asks that torchtitan cannot express (the search's own rule for --framework
    # torchtitan, planner.frameworks): refused, never dropped from the command line.
    for violation in framework("torchtitan").rules(model, training, p):
        raise _reject(violation.field, violation.value, violation.rule)
    dp_replicate, dp_shard = torchtitan_dp_degrees(p)
    _check_degrees(plan, dp_replicate, dp_shard)
    _check_sequence_and_batch(plan)
    overrides: list[tuple[str, Override]] = [
        ("parallelism.data_parallel_replicate_degree", dp_replicate),
        ("parallelism.data_parallel_shard_degree", dp_shard),
        (
            "parallelism.fsdp_reshard_after_forward",
            "always" if p.fsdp else "never" if p.distributed_optimizer else "default",
        ),
        ("parallelism.tensor_parallel_degree", p.tp),
        ("parallelism.enable_sequence_parallel", p.tp > 1),
        ("parallelism.context_parallel_degree", p.cp),
        ("parallelism.pipeline_parallel_degree", p.pp),
        ("parallelism.expert_parallel_degree", p.ep),
    ]
    if p.pp > 1:
        overrides += [
            ("parallelism.pipeline_parallel_schedule", "Interleaved1F1B" if p.vpp > 1 else "1F1B"),
            ("parallelism.pipeline_parallel_microbatch_size", p.micro_batch),
            ("parallelism.module_fqns_per_model_part", _model_parts(plan, model)),
        ]
    overrides += [
        ("training.local_batch_size", training.global_batch // p.dp if p.pp > 1 else p.micro_batch),
        ("training.global_batch_size", training.global_batch),
        ("training.seq_len", training.seq_len),
        ("training.disable_cuda_graphs", True),
    ]
    if training.routing == "balanced" and model.is_moe:
        overrides.append(("debug.moe_force_load_balance", True))
    shipped = next((c for c in SHIPPED_CONFIGS if model.is_moe and c.builds(model)), None)
    return TorchtitanLaunch(shipped, tuple(overrides), p.recompute)


def _notes(plan: Plan, model: ModelSpec, launch: TorchtitanLaunch) -> list[str]:
    """What the config function must do that no command-line flag does."""
    notes = []
    backend = _comm_backend(plan, model)
    if backend != "standard":
        notes.append(
            f"dispatcher {plan.parallel.dispatcher.kind}: the config function must build the model with "
            f'moe_comm_backend="{backend}" (qwen3.config_registry.qwen3_moe_deepep shows how)'
            + ("; the one named below builds standard." if launch.shipped else ".")
        )
    if plan.training.precision != "bf16":
        notes.append(
            f"precision {plan.training.precision}: the config function must apply torchtitan's float8 "
            "converter (Float8LinearConverter; deepseek_v3_671b_float8 shows how)."
        )
    if model.is_moe and not plan.parallel.grouped_gemm:
        notes.append("grouped_gemm false: the config function must build experts without grouped GEMM.")
    if model.mtp_num_layers:
        notes.append(
            f"mtp_num_layers {model.mtp_num_layers}: build the model with num_mtp_layers={model.mtp_num_layers} "
            "(deepseek_v3's model_registry); the shipped config functions build none."
        )
    if plan.parallel.recompute == "selective":
        notes.append("recompute selective: op-level selective AC stands in for Megatron's module list.")
    return notes


def _quote(token: str) -> str:
    """A token for bash, quoted also where it holds a comma (a list of module names, which shellcheck
    would take for a mistyped array)."""
    quoted = shlex.quote(token)
    return f"'{token}'" if quoted == token and "," in token else quoted


def emit_torchtitan(plan: Plan, model: ModelSpec) -> str:
    """A bash snippet: the config function, the override flags and the launch line that uses them."""
    launch = torchtitan_config(plan, model)
    model_name = " ".join(plan.model.name.split())
    where = " ".join(f"{plan.model.name} on {plan.cluster.name}".split())
    lines = [
        f"# torchtitan {TORCHTITAN_VERSION}: moeplan plan of {where}, {plan.num_gpus} GPUs.",
        "# A config function (--module, --config) builds the model, data and optimizer; these overrides set",
        "# the plan's layout, batch and recompute. Launch on each node (the recompute subcommand goes last):",
        '#   torchrun ... -m torchtitan.train --module "$TORCHTITAN_MODULE" --config "$TORCHTITAN_CONFIG" \\',
        '#       "${TORCHTITAN_ARGS[@]}" "$TORCHTITAN_AC"',
        *(f"# {note}" for note in _notes(plan, model, launch)),
    ]
    if launch.shipped is not None:
        lines += [
            f"TORCHTITAN_MODULE={launch.shipped.module}",
            f"TORCHTITAN_CONFIG={launch.shipped.config}",
        ]
    else:
        why = f"torchtitan {TORCHTITAN_VERSION} ships no config function for this model: set"
        lines += [
            f"# torchtitan {TORCHTITAN_VERSION} ships no config function that builds {model_name}: name yours.",
            f'TORCHTITAN_MODULE="${{TORCHTITAN_MODULE:?{why} TORCHTITAN_MODULE to the module of yours}}"',
            f'TORCHTITAN_CONFIG="${{TORCHTITAN_CONFIG:?{why} TORCHTITAN_CONFIG to its name}}"',
        ]
    rows = ("    " + " ".join(_quote(token) for token in group) for group in launch.flag_groups())
    lines += ["TORCHTITAN_ARGS=(", *rows, ")", f"TORCHTITAN_AC={launch.subcommand}"]
    return "\n".join(lines) + "\n"
