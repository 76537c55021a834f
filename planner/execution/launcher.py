"""Start the ranks of a distributed job moeplan runs itself: local processes or testbed namespaces.

The rendezvous is torchrun's ``env://`` one (``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``,
plus ``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` and ``OMP_NUM_THREADS`` as torchrun sets them), so a rank runs
the same code here as under torchrun. Local runs bind the rendezvous to loopback only; testbed runs to
node 0's address inside the emulated network (198.18.0.0/15), nothing outside it.

Rank 0 prints its progress as JSON lines (``PROGRESS_PREFIX``); every other output goes to a log per
rank. The parent reports the stages it sees itself: the ranks starting, started (importing torch and
joining the process group until rank 0 reports), and exiting. Every rank is stopped, and the error quotes
the failing rank's log, when

- a rank exits non-zero;
- a rank stops beating (``process_group.joined`` touches a heartbeat file every ``HEARTBEAT_S``) for the
  job's collective timeout: a stopped process or a frozen host, named as such. When another rank fails
  first (its collective timed out waiting for the stopped one), the silent rank is named as the cause;
- the ranks have not all joined ``STARTUP_S`` plus the timeout after launch;
- the job outlives its own deadline, where it has one (the probe's budget). A run has none: a healthy
  long run is never stopped for its length.

SIGTERM to the launcher stops every rank and removes the job's temporary folder (exit 143), as Ctrl-C
does; a rank whose launcher is killed outright ends itself within a heartbeat. Used by ``moeplan probe``
and ``moeplan run``; torch-free (the parent only starts processes and reads files).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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

STORE_FILE_ENV = "MOEPLAN_STORE_FILE"
"""Set for ranks of one host: the file their process group meets in (``process_group.joined``)."""
HEARTBEAT_FILE_ENV = "MOEPLAN_HEARTBEAT_FILE"
"""Set for each rank: the file its heartbeat touches once it has joined the process group."""
LAUNCHER_PID_ENV = "MOEPLAN_LAUNCHER_PID"
"""Set for each rank: the launcher's process id, its parent while the launcher lives."""
HEARTBEAT_S = 1.0
"""Seconds between a rank's heartbeats."""
SILENT_S = 3 * HEARTBEAT_S
"""A rank this long without a beat is taken for the cause when another rank fails."""
STARTUP_S = 120.0
"""Seconds beyond the collective timeout that ranks may take to import torch and join (a loaded host)."""


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


RANK0 = "Rank 0's"


def _quoted(log: Path, whose: str) -> str:
    """`` Its log ends:`` and the log's last lines, or nothing when the log is empty."""
    text = tail(log)
    return f" {whose} log ends:\n{text}" if text else ""


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
    job: str,
    *,
    timeout_s: float,
    deadline: float | None = None,
    progress: ProgressFn | None = None,
) -> None:
    """Run ``python -m module argument`` on every rank to completion; ExecutionError if any rank fails,
    stops beating for ``timeout_s`` (the job's collective timeout), or the job passes ``deadline`` (epoch
    seconds; None for none).

    Logs go to ``workdir/rank{r}.log``, heartbeats to ``workdir/rank{r}.beat``."""
    world = len(placement.prefixes)
    report: ProgressFn = progress or (lambda done, total, what: None)
    port = _free_port(placement.master_addr)
    threads = max(1, (os.cpu_count() or 1) // placement.ranks_per_node)
    logs = [workdir / f"rank{rank}.log" for rank in range(world)]
    beats = [workdir / f"rank{rank}.beat" for rank in range(world)]
    procs: list[subprocess.Popen[str]] = []
    handles: list[IO[str]] = []
    pump: threading.Thread | None = None
    previous = _stop_on_sigterm(job)
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
                HEARTBEAT_FILE_ENV: str(beats[rank]),
                LAUNCHER_PID_ENV: str(os.getpid()),
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
        _wait(_Job(procs, logs, beats, job, timeout_s, deadline), report)
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
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stop_on_sigterm(job: str) -> signal.Handlers | Callable[..., object] | int | None:
    """Make SIGTERM end the launcher as Ctrl-C does (``finally`` clauses stop the ranks and remove the
    temporary folder), exit 143; return the handler it replaces (None off the main thread: no change)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminated(signum: int, frame: object) -> None:
        sys.stderr.write(f"moeplan {job}: stopped by SIGTERM; every rank is stopped.\n")
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, terminated)


@dataclass(frozen=True)
class _Job:
    """The ranks the launcher watches, and its limits."""

    procs: Sequence[subprocess.Popen[str]]
    logs: Sequence[Path]
    beats: Sequence[Path]
    name: str
    timeout_s: float
    deadline: float | None
    started: float = field(default_factory=time.time)

    def silence(self, now: float) -> list[float | None]:
        """Seconds since each running rank's last heartbeat (None: exited, or not joined yet)."""
        out: list[float | None] = []
        for proc, beat in zip(self.procs, self.beats, strict=True):
            try:
                out.append(now - beat.stat().st_mtime if proc.poll() is None else None)
            except FileNotFoundError:
                out.append(None)
        return out

    def stopped(self, rank: int, silent_s: float) -> ExecutionError:
        return ExecutionError(
            f"{self.name} rank {rank} stopped responding: no heartbeat for {silent_s:.0f} s (the collective "
            f"timeout is {self.timeout_s:g} s). The process is stopped or its host frozen; every rank was "
            f"stopped.{_quoted(self.logs[rank], 'Its')}"
        )


def _wait(job: _Job, report: ProgressFn) -> None:
    exited = 0
    startup_limit = job.started + job.timeout_s + STARTUP_S
    while True:
        codes = [proc.poll() for proc in job.procs]
        if 0 < codes.count(0) < len(codes) and codes.count(0) != exited:
            exited = codes.count(0)
            report(exited, len(codes), f"{exited} of {len(codes)} ranks exited")
        now = time.time()
        silence = job.silence(now)
        for rank, code in enumerate(codes):
            if code not in (None, 0):
                # A rank whose collective timed out waiting for a silent one is not the cause: name that one.
                silent = max(
                    ((quiet, r) for r, quiet in enumerate(silence) if quiet is not None), default=None
                )
                if silent is not None and silent[0] > SILENT_S:
                    raise job.stopped(silent[1], silent[0])
                raise ExecutionError(
                    f"{job.name} rank {rank} exited with code {code}; the other ranks were stopped."
                    f"{_quoted(job.logs[rank], 'Its')}"
                )
        if all(code == 0 for code in codes):
            return
        for rank, quiet in enumerate(silence):
            if quiet is not None and quiet > job.timeout_s:
                raise job.stopped(rank, quiet)
        if now > startup_limit and any(
            code is None and not beat.exists() for code, beat in zip(codes, job.beats, strict=True)
        ):
            raise ExecutionError(
                f"the {job.name}'s ranks did not all join the process group within {now - job.started:.0f} s "
                f"(the collective timeout, {job.timeout_s:g} s, plus {STARTUP_S:.0f} s to start); every rank was "
                f"stopped.{_quoted(job.logs[0], RANK0)}"
            )
        if job.deadline is not None and now > job.deadline:
            raise ExecutionError(
                f"the {job.name} ran past its deadline and was stopped (a rank may be stuck at rendezvous or in a "
                f"collective).{_quoted(job.logs[0], RANK0)}"
            )
        time.sleep(0.1)


def run_job(
    module: str,
    options_json: str,
    placement: RankPlacement,
    job: str,
    *,
    timeout_s: float,
    deadline: float | None = None,
    progress: ProgressFn | None = None,
) -> str:
    """Run a job's ranks (``python -m module OPTIONS``) in a temporary folder and return the record rank 0
    wrote there; ExecutionError, quoting rank 0's log, when it wrote none.

    ``options_json`` is the job's options as JSON, each rank's one argument; this adds the
    ``results_path`` field, where rank 0 writes its record (``write_record``)."""
    with tempfile.TemporaryDirectory(prefix=f"moeplan-{job}-") as tmp:
        results_path = Path(tmp) / "results.json"
        options = {**json.loads(options_json), "results_path": str(results_path)}
        run_ranks(
            module, json.dumps(options), placement, Path(tmp), job,
            timeout_s=timeout_s, deadline=deadline, progress=progress,
        )  # fmt: skip
        if not results_path.is_file():
            raise ExecutionError(
                f"the {job}'s rank 0 ended without a record.\n{tail(Path(tmp) / 'rank0.log')}"
            )
        return results_path.read_text(encoding="utf-8")
