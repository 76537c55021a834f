"""Plan -> launch scripts: a torchrun command and a Slurm batch script.

Both run moeplan's runtime, ``python -m planner run --plan PLAN`` (as ``torchrun ... -m planner run --plan
PLAN``), on every GPU; the Slurm script can launch Megatron-LM's ``pretrain_gpt.py`` with the plan's
arguments instead (``SlurmOptions.launch``). The Slurm script asks for whole nodes as cluster users write
it: ``--exclusive`` with ``--mem=0`` (all of each node's memory: the host optimizer and the data loaders
need it), ``--output``/``--error`` paths (``%x-%j.out``: job name and id), partition and account. Every value is shell-quoted with ``shlex.quote``; the only unquoted expansions are deliberate
environment references (``$MASTER_ADDR``, ``$SLURM_JOB_ID``), written inside double quotes.

Rendezvous is torchrun's ``c10d`` backend on ``MASTER_ADDR:MASTER_PORT`` (ecosystem.md §3.1, §6.1).
``--node-rank`` is not emitted: torchrun reads it only with the static backend, and under ``srun`` a
``$SLURM_NODEID`` on the command line would be expanded once, by the batch shell, for every node.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Literal

from planner.errors import SpecError
from planner.schema import Plan

__all__ = ["DEFAULT_MASTER_PORT", "SlurmOptions", "emit_slurm", "emit_torchrun", "launch_env"]

DEFAULT_MASTER_PORT = 29500
"""Rendezvous port (torchrun's ``--master-port`` default)."""

_ENV_REFERENCE = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_]\w*)\}|(?P<bare>[A-Za-z_]\w*))")
_SLURM_NAME = re.compile(r"[A-Za-z0-9._-]+")
_SLURM_PARTITION = re.compile(r"[A-Za-z0-9._-]+(?:,[A-Za-z0-9._-]+)*")
_SLURM_TIME = re.compile(r"(?:\d+-)?\d+(?::\d{1,2}){0,2}")


def launch_env(plan: Plan) -> dict[str, str]:
    """Environment exported before the runtime starts."""
    return {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def _check_port(port: int) -> None:
    if not 0 < port < 65536:
        raise SpecError(f"master_port ({port}) must be a TCP port, 1 to 65535.")


def _endpoint(host: str, port: str) -> str:
    """``host:port`` for the shell: an environment reference stays expandable, anything else is quoted."""
    match = _ENV_REFERENCE.fullmatch(host)
    if match is None:
        return shlex.quote(f"{host}:{port}")
    name = match["braced"] or match["bare"]
    return f'"${{{name}}}:{port}"'


def _exports(plan: Plan) -> list[str]:
    return [f"export {name}={shlex.quote(value)}" for name, value in launch_env(plan).items()]


def _torchrun_head(nnodes: int, nproc: int, endpoint: str, rdzv_id: str) -> list[str]:
    return [
        "torchrun \\",
        f"    --nnodes {nnodes} \\",
        f"    --nproc-per-node {nproc} \\",
        "    --rdzv-backend c10d \\",
        f"    --rdzv-endpoint {endpoint} \\",
        f"    --rdzv-id {rdzv_id} \\",
    ]


def _torchrun_lines(plan_path: str, nnodes: int, nproc: int, endpoint: str, rdzv_id: str) -> list[str]:
    return [
        *_torchrun_head(nnodes, nproc, endpoint, rdzv_id),
        f"    -m planner run --plan {shlex.quote(plan_path)}",
    ]


def _header(plan: Plan) -> str:
    where = " ".join(f"{plan.model.name} on {plan.cluster.name}".split())
    return f"# moeplan runtime for the plan of {where}, {plan.num_gpus} GPUs."


def emit_torchrun(
    plan: Plan,
    *,
    plan_path: str,
    master_addr: str = "$MASTER_ADDR",
    master_port: int = DEFAULT_MASTER_PORT,
    rdzv_id: str = "moeplan",
) -> str:
    """Exports and one ``torchrun`` command for the plan's node shape; run it on every node (the same line
    on each)."""
    _check_port(master_port)
    nnodes, nproc_per_node = plan.num_nodes, plan.num_gpus_per_node
    lines = [
        _header(plan),
        f"# Run the same command on each of the {nnodes} node(s); they meet at the c10d rendezvous.",
        *_exports(plan),
        *_torchrun_lines(
            plan_path, nnodes, nproc_per_node, _endpoint(master_addr, str(master_port)), shlex.quote(rdzv_id)
        ),
    ]
    return "\n".join(lines) + "\n"


_SLURM_PATH = re.compile(r"[A-Za-z0-9._/%-]+")

_SBATCH_RULES = {
    "job_name": (_SLURM_NAME, "may hold only letters, digits, dot, dash and underscore"),
    "time": (_SLURM_TIME, "must be a Slurm time: minutes, HH:MM:SS or D-HH:MM:SS"),
    "partition": (_SLURM_PARTITION, "must be partition names separated by commas"),
    "account": (_SLURM_NAME, "may hold only letters, digits, dot, dash and underscore"),
    "output": (_SLURM_PATH, "must be a path of letters, digits, '.', '_', '-', '/' and Slurm's % patterns"),
    "error": (_SLURM_PATH, "must be a path of letters, digits, '.', '_', '-', '/' and Slurm's % patterns"),
}


@dataclass(frozen=True, slots=True)
class SlurmOptions:
    """What a Slurm script asks of the scheduler, and what it launches."""

    job_name: str = "moeplan"
    time: str = "01:00:00"
    partition: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None
    """CPUs for each node's task (torchrun and its workers); null: Slurm's default."""
    output: str = "%x-%j.out"
    error: str | None = None
    """Null: standard error goes to ``output``."""
    launch: Literal["runtime", "megatron", "torchtitan"] = "runtime"
    """``runtime``: moeplan's runtime runs the plan; ``megatron``: Megatron-LM's ``pretrain_gpt.py`` with the
    plan's arguments (``$MEGATRON_LM``: a Megatron-LM checkout; the script's own arguments are appended:
    data, tokenizer and learning-rate flags); ``torchtitan``: ``torchtitan.train`` with the plan's
    overrides (the script's own arguments follow them, before the recompute subcommand)."""
    master_port: int = DEFAULT_MASTER_PORT


def _check_sbatch_options(**options: str | None) -> None:
    """sbatch reads ``#SBATCH`` lines itself, without a shell: only plain names may go there."""
    for name, value in options.items():
        pattern, rule = _SBATCH_RULES[name]
        if value is not None and pattern.fullmatch(value) is None:
            raise SpecError(f"{name} ({value!r}) {rule}.")


def emit_slurm(
    plan: Plan, *, plan_path: str, options: SlurmOptions | None = None, framework_snippet: str | None = None
) -> str:
    """An sbatch script for the plan's node shape: one srun task per node, each a torchrun starting that
    node's GPU workers. ``framework_snippet`` is required with ``launch: megatron`` (``emit_megatron``'s
    text) and ``launch: torchtitan`` (``emit_torchtitan``'s)."""
    o = options or SlurmOptions()
    _check_port(o.master_port)
    nnodes, gpus_per_node = plan.num_nodes, plan.num_gpus_per_node
    _check_sbatch_options(
        job_name=o.job_name,
        time=o.time,
        partition=o.partition,
        account=o.account,
        output=o.output,
        error=o.error,
    )
    if o.cpus_per_task is not None and o.cpus_per_task < 1:
        raise SpecError(f"cpus_per_task ({o.cpus_per_task}) must be at least 1.")
    directives = [
        f"--job-name={o.job_name}",
        f"--nodes={nnodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={gpus_per_node}",
        *([f"--cpus-per-task={o.cpus_per_task}"] if o.cpus_per_task is not None else []),
        "--exclusive",
        "--mem=0",
        f"--time={o.time}",
        *([f"--partition={o.partition}"] if o.partition is not None else []),
        *([f"--account={o.account}"] if o.account is not None else []),
        f"--output={o.output}",
        *([f"--error={o.error}"] if o.error is not None else []),
    ]
    endpoint, rdzv_id = '"${MASTER_ADDR}:${MASTER_PORT}"', '"$SLURM_JOB_ID"'
    if o.launch == "runtime":
        what = [f"# The plan file ({plan_path}) must be readable from every node.", *_exports(plan)]
        run = _torchrun_lines(plan_path, nnodes, gpus_per_node, endpoint, rdzv_id)
    elif framework_snippet is None:
        raise SpecError(f"launch {o.launch} needs the plan's {o.launch} arguments (emit_{o.launch}).")
    elif o.launch == "megatron":
        what = [
            "# Megatron-LM's pretrain_gpt.py from $MEGATRON_LM (a checkout readable from every node), with the",
            "# plan's arguments; this script's own arguments follow them (data, tokenizer, learning rate).",
            "MEGATRON_LM=${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout}",
            *framework_snippet.rstrip("\n").splitlines(),
        ]
        run = _torchrun_head(nnodes, gpus_per_node, endpoint, rdzv_id) + [
            '    "${MEGATRON_LM}/pretrain_gpt.py" "${MEGATRON_ARGS[@]}" "$@"'
        ]
    else:
        what = [
            "# torchtitan.train (installed on every node) with the plan's overrides; this script's own arguments",
            "# follow them (data, optimizer, steps: --section.field value), before the recompute subcommand.",
            *framework_snippet.rstrip("\n").splitlines(),
        ]
        run = _torchrun_head(nnodes, gpus_per_node, endpoint, rdzv_id) + [
            '    -m torchtitan.train --module "$TORCHTITAN_MODULE" --config "$TORCHTITAN_CONFIG" \\',
            '    "${TORCHTITAN_ARGS[@]}" "$@" "$TORCHTITAN_AC"',
        ]
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {directive}" for directive in directives),
        _header(plan),
        f"# {nnodes} nodes x {gpus_per_node} GPUs.",
        "set -euo pipefail",
        "",
        *what,
        "# The first node of the allocation hosts the c10d rendezvous.",
        'nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        'MASTER_ADDR=$(head -n 1 <<<"$nodes")',
        "export MASTER_ADDR",
        f"export MASTER_PORT={o.master_port}",
        "",
        f"srun --nodes={nnodes} --ntasks-per-node=1 \\",
        *run,
    ]
    return "\n".join(lines) + "\n"
