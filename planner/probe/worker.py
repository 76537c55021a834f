"""One probe rank: join the rendezvous, find out which ranks share a node, measure, hand rank 0 the record.

Started by torchrun on a real cluster (``torchrun ... -m planner.cli probe``: the CLI calls
:func:`run_rank` in-process) or by ``planner.workflows.probe.launch`` for ``--nproc`` and ``--testbed``
(``python -m planner.probe.worker OPTIONS_JSON``). Either way the rendezvous is torchrun's ``env://``
one: ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``.

Which ranks share a node is decided from what each rank reports at rendezvous (host name and the
local address it reaches ``MASTER_ADDR`` from), never from rank numbers: torchrun and Slurm usually
place ranks node-contiguously, but nothing guarantees it, and two network namespaces on one host
(the testbed) are two nodes.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from planner.execution.launcher import ProgressFn, print_progress, write_record
from planner.execution.process_group import joined
from planner.probe.bandwidth import BENCH_KINDS
from planner.probe.collectives import SeriesPlan, group_sets, measure_series
from planner.probe.device import device_name, measure_device
from planner.probe.probe_options import ProbeOptions
from planner.probe.results import Measurement, ProbeResults, RankIdentity, group_into_nodes

__all__ = ["main", "run_rank"]

COMPUTE_SHARE = 0.15
"""Share of the measuring time given to the device's compute microbenchmarks."""
RESERVE_S = 2.0
"""Seconds kept back at the end of the budget for gathering the record and writing the profile."""
RESERVE_FRACTION = 0.1
"""Share of the budget kept back as well: a series stops when its next size is predicted not to fit, and
on a slow link that prediction can be seconds short (one 64 MiB operation at 150 Mbit/s takes 3.6 s; a
CI run of the testbed probe overran a 90 s budget by 2.8 s with the fixed reserve alone)."""


def _reserve(budget_s: float) -> float:
    return RESERVE_S + RESERVE_FRACTION * budget_s


def _local_address(master: str) -> str:
    """The local address this rank reaches the rendezvous host from (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((master, 9))
            return str(probe.getsockname()[0])
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def _nvidia_smi_topo_text() -> str | None:
    """``nvidia-smi topo -m`` as printed, or None where nvidia-smi is missing or fails."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 and done.stdout.strip() else None


def _library_versions(backend: str) -> dict[str, str]:
    versions = {"torch": torch.__version__, "python": sys.version.split()[0], "backend": backend}
    try:
        from importlib.metadata import version

        versions["moeplan"] = version("moeplan")
    except Exception:  # noqa: BLE001 - an uninstalled checkout has no metadata; the record still stands
        pass
    if torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
        nccl = torch.cuda.nccl.version()  # type: ignore[no-untyped-call]
        versions["nccl"] = ".".join(str(part) for part in nccl) if isinstance(nccl, tuple) else str(nccl)
    return versions


def run_rank(options: ProbeOptions, progress: ProgressFn | None = None) -> ProbeResults | None:
    """This rank's share of the probe; rank 0 returns the whole record, the others None."""
    with joined(options.backend, options.timeout_s) as device:
        return _probe(options, device, progress)


def _probe(options: ProbeOptions, device: torch.device, progress: ProgressFn | None) -> ProbeResults | None:
    rank, world = dist.get_rank(), dist.get_world_size()
    me = RankIdentity(
        rank=rank,
        hostname=socket.gethostname(),
        address=_local_address(os.environ.get("MASTER_ADDR", "127.0.0.1")),
        device=str(device),
        device_name=device_name(device),
    )
    gathered: list[object] = [None] * world
    dist.all_gather_object(gathered, me.model_dump())
    identities = [RankIdentity.model_validate(item) for item in gathered]
    nodes = group_into_nodes(identities)
    node_index = next(i for i, node in enumerate(nodes) if rank in node)

    # nvidia-smi's matrix, once per node (from the node's lowest rank), where GPUs exist.
    topo_text = _nvidia_smi_topo_text() if device.type == "cuda" and rank == nodes[node_index][0] else None
    topo_all: list[object] = [None] * world
    dist.all_gather_object(topo_all, (node_index, topo_text))
    nvidia_smi_topo: dict[int, str] = {}
    for item in topo_all:
        assert isinstance(item, tuple | list)
        if item[1]:
            nvidia_smi_topo[int(item[0])] = str(item[1])

    sets = group_sets(nodes)
    series = [(group, kind) for group in sets for kind in BENCH_KINDS]
    steps = len(series) + 1
    # Rank 0 decides the time split so that every rank follows the same plan.
    remaining = [max(1.0, options.started + options.budget_s - _reserve(options.budget_s) - time.time())]
    dist.broadcast_object_list(remaining, src=0)
    measuring_s = float(remaining[0])

    def report(done: int, what: str) -> None:
        if rank == 0 and progress is not None:
            progress(done, steps, what)

    report(0, "device: GEMM, attention, memory copy, launch overhead")
    compute = measure_device(device, len(nodes[0]), COMPUTE_SHARE * measuring_s / 9)
    dist.barrier()
    # Each series gets an equal share of the time left on rank 0's clock (broadcast, so every rank plans
    # the same); time a series does not use rolls over to the next ones.
    deadline = options.started + options.budget_s - _reserve(options.budget_s)
    measurements: list[Measurement] = []
    for done, (group, kind) in enumerate(series, start=1):
        report(done, f"{kind} on {group.scope} ({group.count} x {group.group_size} ranks)")
        left = [max(0.0, deadline - time.time())]
        dist.broadcast_object_list(left, src=0)
        share = float(left[0]) / (len(series) - done + 1)
        plan = SeriesPlan(min_bytes=options.min_bytes, max_bytes=options.max_bytes, budget_s=share)
        measurements.extend(measure_series(kind, group, plan, device))
    report(steps, "done")
    if rank != 0:
        return None
    return ProbeResults(
        command=options.command,
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        backend=options.backend,
        world_size=world,
        budget_s=options.budget_s,
        elapsed_s=time.time() - options.started,
        identities=tuple(identities),
        nodes=nodes,
        measurements=tuple(measurements),
        device=compute,
        nvidia_smi_topo=nvidia_smi_topo,
        library_versions=_library_versions(options.backend),
        interface=os.environ.get("GLOO_SOCKET_IFNAME") if options.backend == "gloo" else None,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of a launched rank: ``python -m planner.probe.worker OPTIONS_JSON``."""
    args = sys.argv[1:] if argv is None else argv
    options = ProbeOptions.model_validate_json(args[0])
    results = run_rank(options, print_progress)
    if results is not None:
        write_record(options.results_path, results.model_dump_json(indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
