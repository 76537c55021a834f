"""The checkpoint folder of a run, checked before anything in it is read (no torch here: the launcher
checks it before ranks start, and each rank again before it loads).

A checkpoint folder is trusted input, as torch's and Megatron-LM's are: DCP's ``.metadata`` is unpickled
when a checkpoint is loaded, so whoever can write the folder can run code in every rank. moeplan therefore
reads only a folder that is this user's and not writable by others, and ``latest`` may name only a
checkpoint inside the folder (``step-NNNNNN``, a directory there), never a path elsewhere: a planted
``latest`` pointing at ``/tmp/evil`` is refused, not loaded.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from planner.errors import SpecError

__all__ = ["CHECKPOINT_NAME", "LATEST", "check_checkpoint_dir", "latest_checkpoint"]

LATEST = "latest"
CHECKPOINT_NAME = re.compile(r"step-\d{6}")
"""What ``latest`` may hold: the name of a checkpoint in the same folder (``runtime.checkpoint._name``)."""


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
