"""Progress of long work, on stderr only (stdout stays the command's output, ``--json`` included).

On a terminal: one transient line (spinner, what is happening, a bar when the total is known, elapsed
time) redrawn in place and erased when the work ends. Anywhere else (a log file, CI, a pipe): plain
lines ``moeplan LABEL: WHAT (N s)``, one at each milestone (``done`` 0: a stage starts; ``done ==
total``: it ends) and otherwise at most one every ``PLAIN_EVERY_S`` seconds, like a training log. Work
that ends within ``delay_s`` shows nothing either way; milestones within it are shown once it outlasts it.
"""

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import RenderableType
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from planner.cli.app import err
from planner.execution.launcher import ProgressFn

__all__ = ["PLAIN_EVERY_S", "progress_bar"]

PLAIN_EVERY_S = 10.0
"""Seconds between two plain progress lines within one stage (no terminal)."""


class _Delayed(Progress):
    """A rich Progress that draws nothing until ``delay_s`` after it was made."""

    def __init__(self, *columns: Any, delay_s: float, **kwargs: Any) -> None:
        self._shown_after = time.perf_counter() + delay_s  # read by the constructor's first render
        super().__init__(*columns, **kwargs)

    def get_renderables(self) -> Iterable[RenderableType]:
        if time.perf_counter() >= self._shown_after:
            yield from super().get_renderables()


@contextmanager
def progress_bar(label: str, delay_s: float = 0.0) -> Iterator[ProgressFn]:
    """Progress of ``label``'s work on stderr; yields the ``(done, total, what)`` callback to report to
    (total 0: not known).

    The callback may be called from any thread (the launcher reports rank 0's progress from its own)."""
    if err.is_interactive:
        with _Delayed(
            SpinnerColumn(), TextColumn(f"[bold]{label}[/]"), BarColumn(bar_width=12),
            TextColumn("{task.description}"), TimeElapsedColumn(),
            console=err, transient=True, redirect_stdout=False, delay_s=delay_s,
        ) as bar:  # fmt: skip
            task = bar.add_task("starting", total=None)

            def update(done: int, total: int, what: str) -> None:
                bar.update(task, completed=done, total=total or None, description=what)

            yield update
        return
    start = time.perf_counter()
    last: float | None = None
    early: list[tuple[float, str]] = []
    """Milestones reported within ``delay_s``: shown, at their own times, once the work outlasts it."""
    lock = threading.Lock()

    def show(at: float, what: str) -> None:
        err.print(f"moeplan {label}: {what} ({at - start:.0f} s)", markup=False, highlight=False,
                  soft_wrap=True)  # fmt: skip

    def line(done: int, total: int, what: str) -> None:
        nonlocal last
        now = time.perf_counter()
        milestone = done in (0, total)
        with lock:
            if now - start < delay_s:
                if milestone:
                    early.append((now, what))
                return
            for at, said in early:
                show(at, said)
            early.clear()
            if last is not None and not milestone and now - last < PLAIN_EVERY_S:
                return
            last = now
            show(now, what)

    yield line
