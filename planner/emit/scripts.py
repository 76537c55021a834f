"""Plan -> launch scripts for moeplan's own runtime: a torchrun command and a Slurm batch script.

Both run ``python -m planner run --plan PLAN`` (as ``torchrun ... -m planner run --plan PLAN``) on every
GPU. Every value is shell-quoted with ``shlex.quote``; the only unquoted expansions are deliberate
environment references (``$MASTER_ADDR``, ``$SLURM_JOB_ID``), written inside double quotes.

Rendezvous is torchrun's ``c10d`` backend on ``MASTER_ADDR:MASTER_PORT`` (ecosystem.md §3.1, §6.1).
``--node-rank`` is not emitted: torchrun reads it only with the static backend, and under ``srun`` a
``$SLURM_NODEID`` on the command line would be expanded once, by the batch shell, for every node.
"""

from __future__ import annotations

import re
import shlex

from planner.errors import SpecError
from planner.schema import Plan

__all__ = ["DEFAULT_MASTER_PORT", "emit_slurm", "emit_torchrun", "launch_env"]

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


def _torchrun_lines(plan_path: str, nnodes: int, nproc: int, endpoint: str, rdzv_id: str) -> list[str]:
    return [
        "torchrun \\",
        f"    --nnodes {nnodes} \\",
        f"    --nproc-per-node {nproc} \\",
        "    --rdzv-backend c10d \\",
        f"    --rdzv-endpoint {endpoint} \\",
        f"    --rdzv-id {rdzv_id} \\",
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


_SBATCH_RULES = {
    "job_name": (_SLURM_NAME, "may hold only letters, digits, dot, dash and underscore"),
    "time": (_SLURM_TIME, "must be a Slurm time: minutes, HH:MM:SS or D-HH:MM:SS"),
    "partition": (_SLURM_PARTITION, "must be partition names separated by commas"),
}


def _check_sbatch_options(**options: str | None) -> None:
    """sbatch reads ``#SBATCH`` lines itself, without a shell: only plain names may go there."""
    for name, value in options.items():
        pattern, rule = _SBATCH_RULES[name]
        if value is not None and pattern.fullmatch(value) is None:
            raise SpecError(f"{name} ({value!r}) {rule}.")


def emit_slurm(
    plan: Plan,
    *,
    plan_path: str,
    job_name: str = "moeplan",
    time: str = "01:00:00",
    partition: str | None = None,
    cpus_per_task: int | None = None,
    master_port: int = DEFAULT_MASTER_PORT,
) -> str:
    """An sbatch script for the plan's node shape: one srun task per node, each a torchrun starting that
    node's GPU workers."""
    _check_port(master_port)
    nnodes, gpus_per_node = plan.num_nodes, plan.num_gpus_per_node
    _check_sbatch_options(job_name=job_name, time=time, partition=partition)
    if cpus_per_task is not None and cpus_per_task < 1:
        raise SpecError(f"cpus_per_task ({cpus_per_task}) must be at least 1.")
    directives = [
        f"--job-name={job_name}",
        f"--nodes={nnodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={gpus_per_node}",
        *([f"--cpus-per-task={cpus_per_task}"] if cpus_per_task is not None else []),
        "--exclusive",
        f"--time={time}",
        *([f"--partition={partition}"] if partition is not None else []),
    ]
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {directive}" for directive in directives),
        _header(plan),
        f"# {nnodes} nodes x {gpus_per_node} GPUs; the plan file must be readable from every node.",
        "set -euo pipefail",
        "",
        *_exports(plan),
        "# The first node of the allocation hosts the c10d rendezvous.",
        'nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        'MASTER_ADDR=$(head -n 1 <<<"$nodes")',
        "export MASTER_ADDR",
        f"export MASTER_PORT={master_port}",
        "",
        f"srun --nodes={nnodes} --ntasks-per-node=1 \\",
        *_torchrun_lines(
            plan_path, nnodes, gpus_per_node, '"${MASTER_ADDR}:${MASTER_PORT}"', '"$SLURM_JOB_ID"'
        ),
    ]
    return "\n".join(lines) + "\n"
