"""The checkpoint folder of a run, checked before anything in it is read (no torch here: the launcher
checks it before ranks start, and each rank again before it loads); what a checkpoint records of its run,
and which old checkpoints a run removes.

A checkpoint folder is trusted input, as torch's and Megatron-LM's are: DCP's ``.metadata`` is unpickled
when a checkpoint is loaded, so whoever can write the folder can run code in every rank. moeplan therefore
reads only a folder that is this user's and not writable by others, and ``latest`` may name only a
checkpoint inside the folder (``step-NNNNNN``, a directory there), never a path elsewhere: a planted
``latest`` pointing at ``/tmp/evil`` is refused, not loaded.

Each checkpoint holds ``layout.json`` (``checkpoint_layout``): the world size, the parallel settings and
the model of the run that wrote it. Every rank's state is saved under its own rank, so ``--resume``
continues only a run of the same layout; ``check_resume`` refuses any other (and a checkpoint without
the record) before ranks start, naming what differs, instead of a rank failing inside DCP.

A run keeps the newest ``keep_checkpoints`` checkpoints: ``prunable`` says which folders rank 0 removes
after replacing ``latest`` (older ``step-NNNNNN`` folders and crashed saves' staging folders, never
anything else in the folder).
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from planner.errors import SpecError
from planner.schema import ModelSpec, ParallelConfig

__all__ = [
    "CHECKPOINT_NAME",
    "LATEST",
    "LAYOUT",
    "STAGING_NAME",
    "check_checkpoint_dir",
    "check_resume",
    "checkpoint_layout",
    "latest_checkpoint",
    "prunable",
]

LATEST = "latest"
CHECKPOINT_NAME = re.compile(r"step-\d{6}")
"""What ``latest`` may hold: the name of a checkpoint in the same folder (``runtime.checkpoint._name``)."""
STAGING_NAME = re.compile(r"\.step-\d{6}\.partial")
"""A checkpoint being written (``runtime.checkpoint.save``); one left behind is a crashed save's."""
LAYOUT = "layout.json"
"""The record of the run that wrote a checkpoint, inside the checkpoint's folder."""
LAYOUT_FORMAT = "moeplan-checkpoint-layout/1"
_LAYOUT_MAX_BYTES = 1 << 20
_MODEL_DESCRIPTION = frozenset({"name", "source", "notes", "semantics_source"})
"""Model fields that describe it without shaping it: a resume need not match them."""


def check_checkpoint_dir(directory: Path) -> None:
    """SpecError unless ``directory`` is absent (a new run makes it) or a folder this user owns that others
    cannot write."""
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SpecError(f"--checkpoint-dir '{directory}' cannot be read: {exc.strerror or exc}.") from None
    if not stat.S_ISDIR(info.st_mode):
        raise SpecError(f"--checkpoint-dir '{directory}' is not a folder.")
    if info.st_uid != os.getuid():
        raise SpecError(
            f"--checkpoint-dir '{directory}' belongs to another user (uid {info.st_uid}): a checkpoint is code "
            "its loader runs (pickled metadata), so moeplan reads only your own."
        )
    if info.st_mode & stat.S_IWOTH:
        raise SpecError(
            f"--checkpoint-dir '{directory}' is writable by every user (mode {stat.S_IMODE(info.st_mode):o}): "
            "anyone could plant a checkpoint there; chmod o-w it."
        )


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint ``latest`` names in ``directory`` (None when there is no ``latest``), checked as the
    module docstring says; SpecError for anything else."""
    check_checkpoint_dir(directory)
    pointer = directory / LATEST
    try:
        info = os.lstat(pointer)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_size > 64:
        raise SpecError(f"'{pointer}' is not the one-line file moeplan writes (a link, or too long).")
    name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    if CHECKPOINT_NAME.fullmatch(name) is None:
        raise SpecError(f"'{pointer}' names {name[:40]!r}, not a checkpoint of this folder (step-NNNNNN).")
    checkpoint = directory / name
    try:
        is_folder = stat.S_ISDIR(os.lstat(checkpoint).st_mode)
    except FileNotFoundError:
        is_folder = False
    if not is_folder:
        raise SpecError(f"'{pointer}' names {name}, which is not a checkpoint folder in '{directory}'.")
    return checkpoint


def checkpoint_layout(model_name: str, model: ModelSpec, parallel: ParallelConfig) -> dict[str, Any]:
    """What a checkpoint records of the run that wrote it (``layout.json``), as JSON data. The world size
    is the dense grid's product, which ``feasibility.check_grid`` makes the run's."""
    return {
        "format": LAYOUT_FORMAT,
        "world_size": parallel.tp * parallel.cp * parallel.pp * parallel.dp,
        "model_name": model_name,
        "model": model.model_dump(mode="json"),
        "parallel": parallel.model_dump(mode="json"),
    }


def check_resume(directory: Path, layout: dict[str, Any]) -> Path:
    """The checkpoint ``--resume`` loads (``latest_checkpoint``), once its ``layout.json`` is found to
    record ``layout`` (this run's ``checkpoint_layout``); SpecError naming what differs otherwise."""
    checkpoint = latest_checkpoint(directory)
    if checkpoint is None:
        raise SpecError(f"--resume: '{directory}' holds no checkpoint to resume (no '{LATEST}').")
    saved = _read_layout(checkpoint)
    differences = _differences(saved, json.loads(json.dumps(layout)))  # tuples as JSON lists, like saved
    if differences:
        theirs = ", ".join(f"{label} {_shown(old)}" for label, old, _ in differences)
        ours = ", ".join(f"{label} {_shown(new)}" for label, _, new in differences)
        raise SpecError(
            f"--resume: the checkpoint {checkpoint.name} in '{directory}' was written by "
            f"{_shown(saved.get('world_size'))} ranks with {theirs}; this run has {layout['world_size']} "
            f"ranks with {ours}. --resume continues a run on its own layout (the same ranks, parallel "
            "settings and model, since each rank's state is saved as that rank's): run it so, or start "
            "this one in another --checkpoint-dir."
        )
    return checkpoint


def _read_layout(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's ``layout.json``, refused unless it is the small regular file moeplan writes."""
    path = checkpoint / LAYOUT
    why = (
        f"--resume: the checkpoint {checkpoint.name} in '{checkpoint.parent}' has no readable {LAYOUT}, "
        "the record of the ranks, parallel settings and model that wrote it, which a resume must match"
    )
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise SpecError(
            f"{why}: it was not written by this moeplan (an older one writes none), or not completely. "
            "Start the run in another --checkpoint-dir."
        ) from None
    if not stat.S_ISREG(info.st_mode) or info.st_size > _LAYOUT_MAX_BYTES:
        raise SpecError(f"{why}: '{path}' is a link, not a file, or too large to be moeplan's.")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"{why}: '{path}' is not JSON ({exc}).") from None
    if not isinstance(saved, dict) or saved.get("format") != LAYOUT_FORMAT:
        raise SpecError(f"{why}: '{path}' is not a {LAYOUT_FORMAT} record.")
    return saved


_ABSENT = object()
"""A setting one side's record lacks (``_differences``)."""


def _differences(saved: dict[str, Any], ours: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(label, saved value, this run's value) for each setting a resume must match and does not: the
    parallel settings by their dotted names, the model's shaping fields as ``model <field>``. The world
    size follows from the parallel degrees; it is named alone only when nothing else differs."""
    found = _leaves_differing("", saved.get("parallel", _ABSENT), ours["parallel"])

    def shaping(model: Any) -> Any:
        return (
            {k: v for k, v in model.items() if k not in _MODEL_DESCRIPTION}
            if isinstance(model, dict)
            else model
        )

    found += _leaves_differing("model ", shaping(saved.get("model", _ABSENT)), shaping(ours["model"]))
    if not found and saved.get("world_size") != ours["world_size"]:
        found = [("world size", saved.get("world_size", _ABSENT), ours["world_size"])]
    return found


def _leaves_differing(label: str, saved: Any, ours: Any) -> list[tuple[str, Any, Any]]:
    """Where two JSON values differ: (dotted label, saved, ours) per differing leaf under ``label``."""
    if not (isinstance(saved, dict) and isinstance(ours, dict)):
        return [] if saved == ours else [(label.strip() or "settings", saved, ours)]
    joiner = "." if label and not label.endswith(" ") else ""
    out: list[tuple[str, Any, Any]] = []
    for key in sorted(saved.keys() | ours.keys()):
        out += _leaves_differing(f"{label}{joiner}{key}", saved.get(key, _ABSENT), ours.get(key, _ABSENT))
    return out


def _shown(value: Any) -> str:
    if value is _ABSENT:
        return "(none)"
    return value if isinstance(value, str) else json.dumps(value)


def prunable(names: Iterable[str], latest: str, keep: int) -> list[str]:
    """Which of a checkpoint folder's sub-folders (``names``) rank 0 removes once ``latest`` names a new
    checkpoint, keeping ``keep``: ``latest`` and the newest ``keep - 1`` before it. Removed, oldest first:
    the older ``step-NNNNNN`` folders, then every ``.step-NNNNNN.partial`` (a crashed save's staging).
    Checkpoints numbered after ``latest`` (a run started again in the folder without --resume) stay: they
    are not older, and this run overwrites them when it gets there."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    listed = list(names)
    # Six fixed digits: the names sort as their steps do.
    older = sorted(n for n in listed if CHECKPOINT_NAME.fullmatch(n) and n < latest)
    return older[: max(0, len(older) - (keep - 1))] + sorted(n for n in listed if STAGING_NAME.fullmatch(n))
