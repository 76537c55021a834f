"""One ``moeplan probe``: decide where the ranks run, run them, turn the record into a profile, write it.

Three ways to run, as ``moeplan probe`` documents them:
- under torchrun (``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` in the environment): this process *is* a rank;
  rank 0 builds and writes the profile, the others only measure;
- ``--nproc N``: N local ranks over loopback;
- ``--testbed``: the ranks of ``moeplan testbed up``, each inside its node's network namespace.

The profile goes to ``-o`` (if given) and to ``$MOEPLAN_HOME/last-probe.yaml``, the profile
``moeplan solve`` uses when no ``--cluster`` is given; both written atomically.
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from planner.catalog import LAST_PROBE_NAME, load_gpu, moeplan_home, profile_yaml, store_probed_profile
from planner.errors import SpecError
from planner.execution.devices import Backend, choose_backend
from planner.execution.launcher import (
    ProgressFn,
    RankPlacement,
    local_placement,
    run_job,
    testbed_placement,
    under_torchrun,
)
from planner.probe.build import build_profile, catalog_gpu_for
from planner.probe.probe_options import ProbeOptions
from planner.probe.results import ProbeResults
from planner.schema import ClusterProfile
from planner.specfiles import atomic_write_text

__all__ = ["ProbeOutcome", "ProbeRequest", "run_probe", "write_profile"]


@dataclass(frozen=True)
class ProbeRequest:
    """What the user asked ``moeplan probe`` for."""

    nproc: int | None
    backend: Backend
    testbed: bool
    budget_s: float
    output: Path | None
    name: str | None
    gpu: str | None
    command: str


@dataclass(frozen=True)
class ProbeOutcome:
    """Rank 0's result (None on the other ranks of a torchrun probe)."""

    results: ProbeResults
    profile: ClusterProfile
    written: tuple[Path, ...]


MAX_BUDGET_S = 86_400.0
"""The longest probe: a day (a probe that times every size of every collective takes minutes)."""
GRACE_S = 60.0
"""Seconds a probe may run past its budget (process start-up on a loaded host) before it is stopped."""


def launch(
    options: ProbeOptions, placement: RankPlacement, progress: ProgressFn | None = None
) -> ProbeResults:
    """Run every probe rank (``planner.probe.worker``) to completion and return rank 0's record;
    ExecutionError if any rank fails or the probe overruns its budget."""
    deadline = options.started + options.budget_s + GRACE_S
    record = run_job(
        "planner.probe.worker", options.model_dump_json(), placement, "probe",
        timeout_s=options.timeout_s, deadline=deadline, progress=progress,
    )  # fmt: skip
    return ProbeResults.model_validate_json(record)


def _placement(request: ProbeRequest) -> RankPlacement:
    if request.testbed:
        return testbed_placement(request.nproc)
    if request.nproc is None:
        raise SpecError(
            "moeplan probe needs to know where its ranks run: start it under torchrun (one process per GPU), "
            "or pass --nproc N for N local ranks, or --testbed for the emulated cluster"
        )
    if request.nproc < 2:
        raise SpecError(
            f"--nproc ({request.nproc}) must be at least 2: a cluster profile needs the intra_node link, "
            "which takes two ranks to measure"
        )
    return local_placement(request.nproc)


def _default_name(results: ProbeResults) -> str:
    host = results.identities[0].hostname.split(".")[0]
    return f"probe-{host}-{len(results.nodes)}x{len(results.nodes[0])}"


def run_probe(request: ProbeRequest, progress: ProgressFn | None = None) -> ProbeOutcome | None:
    """Run the probe as requested; rank 0 (or the launching process) gets the outcome, others None."""
    started = time.time()
    if importlib.util.find_spec("torch") is None:
        raise SpecError(
            "moeplan probe measures with torch.distributed, and torch is not installed: "
            "pip install 'moeplan[runtime]' (or torch itself) first"
        )
    if not (math.isfinite(request.budget_s) and 0 < request.budget_s <= MAX_BUDGET_S):
        raise SpecError(
            f"--budget ({request.budget_s:g}) must be above 0 and at most {MAX_BUDGET_S:g} seconds (a day)"
        )
    catalog_gpu = load_gpu(request.gpu) if request.gpu else None  # a bad name fails before any rank starts
    if under_torchrun() and not request.testbed and request.nproc is None:
        from planner.probe.worker import run_rank

        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        options = ProbeOptions(
            backend=choose_backend(request.backend, local),
            budget_s=request.budget_s,
            started=started,
            command=request.command,
        )
        results = run_rank(options, progress)
        if results is None:
            return None
    else:
        placement = _placement(request)
        options = ProbeOptions(
            backend=choose_backend(request.backend, placement.ranks_per_node)
            if not request.testbed
            else "gloo",
            budget_s=request.budget_s,
            started=started,
            command=request.command,
        )
        results = launch(options, placement, progress)
    if catalog_gpu is None and results.device.kind == "cuda":
        name = catalog_gpu_for(results.device.name)
        catalog_gpu = load_gpu(name) if name else None
    profile = build_profile(results, request.name or _default_name(results), catalog_gpu)
    return ProbeOutcome(results, profile, write_profile(profile, request.output))


def write_profile(profile: ClusterProfile, output: Path | None) -> tuple[Path, ...]:
    """Write the profile to ``output`` (if given) and as the last probe, each atomically, and keep a copy
    under its content hash (``catalog.store_probed_profile``): a plan solved on it records that copy,
    which the next probe does not replace."""
    text = profile_yaml(
        profile,
        f"Cluster profile measured by `{profile.provenance.source}` on {profile.provenance.date}",
        f"at {socket.gethostname()}; every figure's source says how it was measured.",
    )
    last = moeplan_home() / LAST_PROBE_NAME
    written = []
    for path in (output, last):
        if path is None:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        written.append(path)
    store_probed_profile(text.encode("utf-8"), profile.name)
    return tuple(written)
