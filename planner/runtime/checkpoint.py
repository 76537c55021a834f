"""Checkpoints of a run with ``torch.distributed.checkpoint`` (DCP), made visible atomically, and resume.

Layout of ``--checkpoint-dir``::

    step-000004/      a complete DCP checkpoint (every rank's shard, DCP's metadata, and layout.json)
    latest            the name of the newest complete checkpoint, one line

A checkpoint is written by every rank (``dcp.save`` is collective) into ``.step-NNNNNN.partial``; only
after every rank has finished does rank 0 add ``layout.json``, rename the directory to ``step-NNNNNN``
and then replace ``latest`` (temporary file + ``os.replace``). A crash at any moment leaves ``latest``
naming a complete checkpoint (or no ``latest`` at all), never a half-written one. Rank 0 then removes
the checkpoints beyond the newest ``keep`` and any crashed save's staging folder
(``planner.execution.checkpoint_dir.prunable``).

Each rank's model and optimizer state is stored under its own key (``rank{r}``): expert-parallel ranks
hold different experts under the same parameter names, which DCP would otherwise take for replicas of one
tensor and keep once. So a checkpoint resumes on the same layout and world size, which is what ``--resume``
is for (continuing an interrupted run); ``layout.json`` records that layout, and a resume on another is
refused before ranks start (``checkpoint_dir.check_resume``, run again here before loading). The
directory must be one all ranks see (local runs, or a shared file system across nodes).

The optimizer's state is taken with ``torch.distributed.checkpoint.state_dict.get_state_dict``, which
initialises AdamW's moments when they do not exist yet, so a fresh optimizer can be loaded into in place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from planner.execution.checkpoint_dir import LATEST, LAYOUT, check_resume, latest_checkpoint, prunable

__all__ = ["LATEST", "load_latest", "save"]


def _name(step: int) -> str:
    return f"step-{step:06d}"


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    model_state, optim_state = get_state_dict(model, optimizer)
    return {f"rank{dist.get_rank()}": {"model": model_state, "optim": optim_state, "step": step}}


def save(
    directory: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    layout: dict[str, Any],
    keep: int,
) -> None:
    """Write the state after ``step`` with ``layout`` (``checkpoint_dir.checkpoint_layout``), then keep
    the newest ``keep`` checkpoints (collective: every rank calls it)."""
    staging = directory / f".{_name(step)}.partial"
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    dcp_save(_state(model, optimizer, step), checkpoint_id=str(staging))
    dist.barrier()
    if dist.get_rank() == 0:
        (staging / LAYOUT).write_text(json.dumps(layout, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        final = directory / _name(step)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        pointer = directory / f".{LATEST}.tmp"
        pointer.write_text(_name(step) + "\n", encoding="utf-8")
        os.replace(pointer, directory / LATEST)
        _prune(directory, _name(step), keep)
    dist.barrier()


def _prune(directory: Path, latest: str, keep: int) -> None:
    """Remove what ``prunable`` names among the real sub-folders (links are not followed, nor removed).
    A folder that cannot be removed is left: training goes on, and the next save tries again."""
    with os.scandir(directory) as entries:
        folders = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    for name in prunable(folders, latest, keep):
        shutil.rmtree(directory / name, ignore_errors=True)


def load_latest(
    directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, layout: dict[str, Any]
) -> int | None:
    """Load the newest complete checkpoint into ``model`` and ``optimizer``; return its step (None if none).

    SpecError unless the checkpoint was written with ``layout``: ``moeplan run`` checked that before
    ranks started; this covers a rank started otherwise and a folder changed since."""
    if latest_checkpoint(directory) is None:
        return None
    checkpoint = check_resume(directory, layout)  # checked: only a checkpoint inside the folder is loaded
    state = _state(model, optimizer, -1)
    dcp_load(state, checkpoint_id=str(checkpoint))
    mine = state[f"rank{dist.get_rank()}"]
    set_state_dict(model, optimizer, model_state_dict=mine["model"], optim_state_dict=mine["optim"])
    return int(mine["step"])
