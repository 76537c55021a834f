"""Join and leave torchrun's ``env://`` rendezvous, with a device per rank: the one way the probe's and the
runtime's ranks start.

Ranks that moeplan starts on one host meet in a ``FileStore`` (``MOEPLAN_STORE_FILE``) rather than the TCP
store, which listens on every interface: a local run opens no socket beyond loopback (gloo binds ``lo``).
NCCL ranks take GPU ``LOCAL_RANK`` (set by torchrun and by ``planner/execution/launcher.py``) and pass it as
``device_id`` so that NCCL initialises eagerly on the right device; gloo ranks compute on the CPU. The
timeout applies to every collective, on the default group and on every ``subgroup``: a rank that dies or
stops makes the others fail after ``timeout_s`` instead of hanging (``dist.new_group`` without a timeout
takes torch's default, 30 minutes on gloo, not the one ``init_process_group`` was given).

A rank started by moeplan's launcher also beats: a daemon thread touches ``MOEPLAN_HEARTBEAT_FILE`` every
``HEARTBEAT_S``, so the launcher can tell a stopped rank (SIGSTOP, a frozen host: no thread of it runs)
from a slow one and name it; the thread ends the rank when the launcher is gone (its parent changed), so
ranks do not outlive a launcher that was killed.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from planner.execution.launcher import HEARTBEAT_FILE_ENV, HEARTBEAT_S, LAUNCHER_PID_ENV, STORE_FILE_ENV

__all__ = ["joined", "subgroup"]

_timeout: dt.timedelta | None = None


def subgroup(ranks: Sequence[int]) -> dist.ProcessGroup:
    """``dist.new_group(ranks)`` with the job's collective timeout (collective: every rank calls it)."""
    group: dist.ProcessGroup = dist.new_group(ranks=list(ranks), timeout=_timeout)
    return group


def _beat(path: Path, launcher_pid: int) -> None:
    """Touch ``path`` every ``HEARTBEAT_S``; end this rank at once when its launcher is gone."""
    while True:
        if os.getppid() != launcher_pid:
            os._exit(1)  # the launcher was killed: nobody reads this rank's output or stops it
        path.touch()
        threading.Event().wait(HEARTBEAT_S)


def _start_heartbeat() -> None:
    beat, launcher = os.environ.get(HEARTBEAT_FILE_ENV), os.environ.get(LAUNCHER_PID_ENV)
    if beat and launcher:
        threading.Thread(target=_beat, args=(Path(beat), int(launcher)), daemon=True).start()


@contextmanager
def joined(backend: str, timeout_s: float) -> Iterator[torch.device]:
    """Initialise the default process group for ``backend``; yield this rank's device; destroy it after."""
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    global _timeout
    timeout = _timeout = dt.timedelta(seconds=timeout_s)
    store_file = os.environ.get(STORE_FILE_ENV)  # ranks of one host
    store = None
    if store_file:
        store = dist.FileStore(store_file, int(os.environ["WORLD_SIZE"]))  # type: ignore[attr-defined]
        store.set_timeout(timeout)
    dist.init_process_group(
        backend,
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,
        store=store,
        rank=int(os.environ["RANK"]) if store is not None else -1,
        world_size=int(os.environ["WORLD_SIZE"]) if store is not None else -1,
    )
    _start_heartbeat()
    try:
        yield device
    finally:
        dist.destroy_process_group()
