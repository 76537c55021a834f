"""Emitters: a Plan as launch configurations. Pure functions; each ``emit_*`` returns text.

Formats (``FORMATS``, ``formats.py``, by name): the canonical plan JSON, Megatron-LM arguments, torchtitan
0.3.0 command-line overrides, and torchrun / Slurm scripts that start moeplan's own runtime (the Slurm script
also Megatron-LM's pretrain_gpt.py or torchtitan.train). An emitter raises SpecError, naming the rule, when
the target cannot express the plan.
"""

from planner.emit.formats import FORMATS, EmitFormat, EmitRequest, emit
from planner.emit.megatron import (
    DEFAULT_MEGATRON_VERSION,
    emit_megatron,
    megatron_args,
    megatron_env,
    parse_megatron_version,
)
from planner.emit.plan_json import emit_plan_json, load_plan, write_plan
from planner.emit.scripts import SlurmOptions, emit_slurm, emit_torchrun, launch_env
from planner.emit.torchtitan import TORCHTITAN_VERSION, emit_torchtitan, torchtitan_config

__all__ = [
    "DEFAULT_MEGATRON_VERSION",
    "FORMATS",
    "EmitFormat",
    "EmitRequest",
    "SlurmOptions",
    "TORCHTITAN_VERSION",
    "emit",
    "emit_megatron",
    "emit_plan_json",
    "emit_slurm",
    "emit_torchrun",
    "emit_torchtitan",
    "launch_env",
    "load_plan",
    "megatron_args",
    "megatron_env",
    "parse_megatron_version",
    "torchtitan_config",
    "write_plan",
]
