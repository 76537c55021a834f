"""Start the ranks of a distributed job moeplan runs itself: local processes or testbed namespaces.

The rendezvous is torchrun's ``env://`` one (``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``,
plus ``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` and ``OMP_NUM_THREADS`` as torchrun sets them), so a rank runs
the same code here as under torchrun. Local runs bind the rendezvous to loopback only; testbed runs to
node 0's address inside the emulated network (198.18.0.0/15), nothing outside it.

Rank 0 prints its progress as JSON lines (``PROGRESS_PREFIX``); every other output goes to a log per
rank. The parent reports the stages it sees itself: the ranks starting, started (importing torch and
joining the process group until rank 0 reports), and exiting. If a rank exits non-zero, or the job outlives its deadline, every rank is stopped and the error
quotes the failing rank's log. Used by ``moeplan probe`` and ``moeplan run``; torch-free (the parent
only starts processes and reads files).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from planner.errors import ExecutionError, SpecError

__all__ = [
    "PROGRESS_PREFIX",
    "ProgressFn",
    "RankPlacement",
    "local_placement",
    "print_progress",
    "run_job",
    "run_ranks",
    "tail",
    "testbed_placement",
    "under_torchrun",
    "write_record",
]

PROGRESS_PREFIX = "MOEPLAN-PROGRESS "
"""Rank 0 prints its progress as this prefix and a JSON object, one per line."""

ProgressFn = Callable[[int, int, str], None]
"""(steps done, steps in all, what is happening now)."""

LOG_TAIL_LINES = 15


def write_record(path: str | None, text: str) -> None:
    """Rank 0 hands its record to the launching parent: written to a temporary file, then renamed, so the
    parent never reads half of one (a missing file means rank 0 did not finish)."""
    if path is None:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(tmp, path)


def print_progress(done: int, total: int, what: str) -> None:
    """A launched rank 0's progress, for the parent to read."""
    print(PROGRESS_PREFIX + json.dumps({"done": done, "total": total, "what": what}), flush=True)


@dataclass(frozen=True)
class RankPlacement:
    """Where each rank runs: a command prefix per rank (e.g. ``ip netns exec mpt-n1``), the rendezvous
    address, the interface gloo binds to, and ranks per node (for LOCAL_RANK and OMP_NUM_THREADS)."""

    prefixes: tuple[tuple[str, ...], ...]
    master_addr: str
    interface: str | None
    ranks_per_node: int


def under_torchrun() -> bool:
    """Whether this process was started as one rank of a torchrun (or Slurm + torchrun) job."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def testbed_placement(nproc: int | None) -> RankPlacement:
    """The running testbed's ranks, each inside its node's namespace (``nproc``, if given, must agree)."""
    from planner.execution.testbed import status

    bed = status()
    if bed is None:
        raise SpecError(
            "--testbed: no testbed is up; start one with `moeplan testbed up --nodes 2 --ranks-per-node 2 "
            "--inter-node-mbit 200` (root only)"
        )
    if nproc is not None and nproc != bed.nodes * bed.ranks_per_node:
        raise SpecError(
            f"--nproc ({nproc}) disagrees with the testbed's {bed.nodes} nodes x {bed.ranks_per_node} ranks; "
            "leave --nproc out with --testbed"
        )
    prefixes = tuple(
        tuple(bed.command_prefix(node)) for node in range(bed.nodes) for _ in range(bed.ranks_per_node)
    )
    return RankPlacement(prefixes, bed.address(0), bed.interface, bed.ranks_per_node)


STORE_FILE_ENV = "MOEPLAN_STORE_FILE"
"""Set for ranks of one host: the file their process group meets in (``process_group.joined``)."""


def local_placement(nproc: int) -> RankPlacement:
    """``nproc`` ranks on this host, talking over loopback."""
    return RankPlacement(
        prefixes=((),) * nproc, master_addr="127.0.0.1", interface="lo", ranks_per_node=nproc
    )


def _free_port(addr: str) -> int:
    if addr.startswith("127."):
        with socket.socket() as sock:
            sock.bind((addr, 0))
            return int(sock.getsockname()[1])
    # A testbed namespace is fresh: nothing else listens there.
    return random.randint(29500, 29999)


def tail(path: Path) -> str:
    """The last lines of a rank's log."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-LOG_TAIL_LINES:])


def _pump_progress(stream: IO[str], progress: ProgressFn | None, log: IO[str]) -> None:
    for line in stream:
        if line.startswith(PROGRESS_PREFIX):
            if progress is not None:
                event = json.loads(line[len(PROGRESS_PREFIX) :])
                progress(int(event["done"]), int(event["total"]), str(event["what"]))
        else:
            log.write(line)
            log.flush()


def run_ranks(
    module: str,
    argument: str,
    placement: RankPlacement,
    workdir: Path,
    deadline: float,
    job: str,
    progress: ProgressFn | None = None,
) -> None:
    """Run ``python -m module argument`` on every rank to completion; ExecutionError if any rank fails.

    Logs go to ``workdir/rank{r}.log``."""
    world = len(placement.prefixes)
    report: ProgressFn = progress or (lambda done, total, what: None)
    port = _free_port(placement.master_addr)
    threads = max(1, (os.cpu_count() or 1) // placement.ranks_per_node)
    logs = [workdir / f"rank{rank}.log" for rank in range(world)]
    procs: list[subprocess.Popen[str]] = []
    handles: list[IO[str]] = []
    pump: threading.Thread | None = None
    try:
        report(0, 0, f"starting {world} ranks")
        for rank, prefix in enumerate(placement.prefixes):
            env = {
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "LOCAL_RANK": str(rank % placement.ranks_per_node),
                "LOCAL_WORLD_SIZE": str(placement.ranks_per_node),
                "MASTER_ADDR": placement.master_addr,
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": str(threads),
                "PYTHONUNBUFFERED": "1",
            }
            if placement.interface:
                env["GLOO_SOCKET_IFNAME"] = placement.interface
            if placement.prefixes[rank] == () and placement.master_addr.startswith("127."):
                # Ranks of this host meet in a file, not a TCP store: torch's store listens on every
                # interface whatever MASTER_ADDR says, which would expose a local run to the network.
                env[STORE_FILE_ENV] = str(workdir / "rendezvous.store")
            argv = [*prefix, sys.executable, "-m", module, argument]
            log = logs[rank].open("w", encoding="utf-8")
            handles.append(log)
            stdout = subprocess.PIPE if rank == 0 else log
            procs.append(
                subprocess.Popen(argv, env=env, stdout=stdout, stderr=log, text=True, cwd=os.getcwd())
            )
            if rank == 0:
                assert procs[0].stdout is not None
                pump = threading.Thread(target=_pump_progress, args=(procs[0].stdout, progress, log))
                pump.start()
        report(0, 0, f"{world} ranks started: importing torch, joining the process group")
        _wait(procs, logs, deadline, job, report)
        report(world, world, f"all {world} ranks exited")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if pump is not None:
            pump.join()
        if procs and procs[0].stdout is not None:
            procs[0].stdout.close()
        for handle in handles:
            handle.close()


def _wait(
    procs: Sequence[subprocess.Popen[str]],
    logs: Sequence[Path],
    deadline: float,
    job: str,
    report: ProgressFn,
) -> None:
    exited = 0
    while True:
        codes = [proc.poll() for proc in procs]
        if 0 < codes.count(0) < len(procs) and codes.count(0) != exited:
            exited = codes.count(0)
            report(exited, len(procs), f"{exited} of {len(procs)} ranks exited")
        for rank, code in enumerate(codes):
            if code not in (None, 0):
                raise ExecutionError(
                    f"{job} rank {rank} exited with code {code}; the other ranks were stopped. "
                    f"Its log ends:\n{tail(logs[rank])}"
                )
        if all(code == 0 for code in codes):
            return
        if time.time() > deadline:
            raise ExecutionError(
                f"the {job} ran past its deadline and was stopped (a rank may be stuck at rendezvous or in a "
                f"collective). Rank 0's log ends:\n{tail(logs[0])}"
            )
        time.sleep(0.1)


def run_job(
    module: str,
    options_json: str,
    placement: RankPlacement,
    deadline: float,
    job: str,
    progress: ProgressFn | None = None,
) -> str:
    """Run a job's ranks (``python -m module OPTIONS``) in a temporary folder and return the record rank 0
    wrote there; ExecutionError, quoting rank 0's log, when it wrote none.

    ``options_json`` is the job's options as JSON, each rank's one argument; this adds the
    ``results_path`` field, where rank 0 writes its record (``write_record``)."""
    with tempfile.TemporaryDirectory(prefix=f"moeplan-{job}-") as tmp:
        results_path = Path(tmp) / "results.json"
        options = {**json.loads(options_json), "results_path": str(results_path)}
        run_ranks(module, json.dumps(options), placement, Path(tmp), deadline, job, progress)
        if not results_path.is_file():
            raise ExecutionError(
                f"the {job}'s rank 0 ended without a record.\n{tail(Path(tmp) / 'rank0.log')}"
            )
        return results_path.read_text(encoding="utf-8")
