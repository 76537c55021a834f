"""Join and leave torchrun's ``env://`` rendezvous, with a device per rank: the one way the probe's and the
runtime's ranks start.

Ranks that moeplan starts on one host meet in a ``FileStore`` (``MOEPLAN_STORE_FILE``) rather than the TCP
store, which listens on every interface: a local run opens no socket beyond loopback (gloo binds ``lo``).
NCCL ranks take GPU ``LOCAL_RANK`` (set by torchrun and by ``planner/execution/launcher.py``) and pass it as
``device_id`` so that NCCL initialises eagerly on the right device; gloo ranks compute on the CPU. The
timeout applies to every collective: a rank that dies makes the others fail after ``timeout_s`` instead
of hanging.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

__all__ = ["joined"]


@contextmanager
def joined(backend: str, timeout_s: float) -> Iterator[torch.device]:
    """Initialise the default process group for ``backend``; yield this rank's device; destroy it after."""
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    timeout = dt.timedelta(seconds=timeout_s)
    store_file = os.environ.get("MOEPLAN_STORE_FILE")  # launcher.STORE_FILE_ENV: ranks of one host
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
    try:
        yield device
    finally:
        dist.destroy_process_group()
