"""The hostile-input corpus (issue 19 item 6, ``corpus.py``): every class for every reader is refused with
exit 2 within the time limit, in one paragraph naming the input and the rule, no traceback, and nothing
written; output targets that are not regular files (or cannot be reached) are refused and left as they were.

The default run invokes each command in-process under a timer (a hang, such as a FIFO opened for reading,
fails the test after ``TIME_LIMIT_S`` instead of blocking the suite); the slow tests run one case per class
through a real ``python -m planner`` process, and ``run``/``probe``'s refusals, which must come before any
rank starts.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.cli.invoke import invoke
from tests.hostile.corpus import (
    MY_CLUSTER,
    OPTION_CASES,
    TIME_LIMIT_S,
    Case,
    OutputCase,
    cases,
    output_cases,
)

CASES = cases()
OUTPUTS = output_cases()

KNOWN_BROKEN: dict[str, str] = {}
"""Cases whose refusal is broken in files outside this change, reported to their owners: expected to fail
(strictly: a fix makes them pass, and then they leave this list)."""


def _params(found: list[Case]) -> list[object]:
    return [
        pytest.param(case, id=case.id, marks=[pytest.mark.xfail(reason=KNOWN_BROKEN[case.id], strict=True)])
        if case.id in KNOWN_BROKEN
        else pytest.param(case, id=case.id)
        for case in found
    ]


class Hung(Exception):
    """A command ran past the time limit."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``Hung`` in the main thread after ``seconds`` (SIGALRM interrupts a blocking ``open`` too); the
    timer pytest-timeout may have set is put back afterwards."""

    def expire(signum: int, frame: object) -> None:
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 0.001))


def flat(text: str) -> str:
    """Text without whitespace and the error panel's borders, so wrapped words and paths compare whole."""
    return re.sub(r"[\s│╭╮╰╯─]", "", text)


def tree(folder: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under ``folder`` with its kind and, for small regular files, its bytes."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            info = os.lstat(path)
            small = stat.S_ISREG(info.st_mode) and info.st_size < 2**20
            found[str(path.relative_to(folder))] = (
                stat.S_IFMT(info.st_mode),
                path.read_bytes() if small else None,
            )
    return found


def refused(args: list[str], code: int = 2) -> tuple[str, float]:
    """Run a command in-process under the time limit; its stderr and seconds, after the common asserts."""
    start = time.monotonic()
    with time_limit(TIME_LIMIT_S):
        got, stdout, stderr = invoke(*args)  # an exception here is a traceback a user would see
    seconds = time.monotonic() - start
    assert got == code, f"exit {got}, expected {code}\nstdout: {stdout[-2000:]}\nstderr: {stderr[-2000:]}"
    assert "Traceback" not in stderr
    if code == 2:
        assert stdout == "", stdout[-2000:]
        assert "moeplan: error" in stderr or "Invalid value" in stderr or "Error" in stderr, stderr
    return stderr, seconds


@pytest.mark.parametrize("case", _params(CASES))
def test_hostile_input_is_refused(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # a relative name (the bare long name) resolves here
    given = case.build(work)
    before = tree(work)
    output = work / "output.out"
    stderr, _ = refused(case.reader.argv(given, output), case.code)
    if case.code == 2:
        for word in case.words:
            assert flat(word) in flat(stderr), f"{word!r} not named in:\n{stderr}"
        assert tree(work) == before, "the command wrote something"
    assert not Path("PWNED").exists()


@pytest.mark.parametrize("case", OUTPUTS, ids=[c.id for c in OUTPUTS])
def test_output_target_is_refused_and_left_as_it_was(case: OutputCase, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    target = case.build(work)
    outside = [target] if not target.is_relative_to(work) else []
    snapshot = [(os.lstat(p).st_mode, p.read_bytes() if p.is_file() else None) for p in outside]
    before = tree(work)
    stderr, _ = refused(case.writer.argv(target))
    for word in case.words:
        assert flat(word) in flat(stderr), f"{word!r} not named in:\n{stderr}"
    assert tree(work) == before
    assert snapshot == [(os.lstat(p).st_mode, p.read_bytes() if p.is_file() else None) for p in outside]


@pytest.mark.parametrize(
    ("args", "word"), OPTION_CASES, ids=[" ".join(a[:1] + a[-2:])[:60] for a, _ in OPTION_CASES]
)
def test_option_out_of_range_is_refused(args: tuple[str, ...], word: str) -> None:
    stderr, _ = refused(list(args))
    assert flat(word) in flat(stderr), stderr


# One case per class through a real process, and what only a process can show: run and probe's refusals
# (which must come before any rank starts), a read-only and a full file system (a private mount namespace).


def subprocess_refused(args: list[str], cwd: Path, code: int = 2) -> str:
    """Run ``python -m planner ARGS`` with the time limit (its process group killed past it)."""
    started = subprocess.Popen(
        [sys.executable, "-m", "planner", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    try:
        stdout, stderr = started.communicate(timeout=TIME_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(started.pid, signal.SIGKILL)
        started.communicate()
        raise AssertionError(f"moeplan {' '.join(args)[:200]} still running after {TIME_LIMIT_S} s") from None
    assert started.returncode == code, f"exit {started.returncode}\n{stdout[-2000:]}\n{stderr[-2000:]}"
    assert "Traceback" not in stderr, stderr
    return stderr


def _one_per_class() -> list[Case]:
    chosen: dict[str, Case] = {}
    for case in CASES:
        key = case.cls.split("=")[0] if case.cls.startswith("number-") else case.cls
        if case.code == 2 and key not in chosen and case.id not in KNOWN_BROKEN:
            chosen[key] = case
    return list(chosen.values())


ONE_PER_CLASS = _one_per_class()


@pytest.mark.slow
@pytest.mark.parametrize("case", ONE_PER_CLASS, ids=[c.id for c in ONE_PER_CLASS])
def test_one_per_class_through_a_process(case: Case, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    given = case.build(work)
    before = tree(work)
    stderr = subprocess_refused(case.reader.argv(given, work / "output.out"), work)
    for word in case.words:
        assert flat(word) in flat(stderr), f"{word!r} not named in:\n{stderr}"
    assert tree(work) == before


RUN = ["run", "--nproc", "2", "--steps", "1"]


def _run_inputs(work: Path) -> list[tuple[list[str], str]]:
    fifo = work / "fifo.yaml"
    os.mkfifo(fifo)
    bomb = work / "bomb.yaml"
    bomb.write_text(MY_CLUSTER.read_text() + "".join(
        f"x_{i}: &x_{i} [{', '.join([f'*x_{i - 1}' if i else 'lol'] * 9)}]\n" for i in range(10)))  # fmt: skip
    return [
        ([*RUN, "--model", str(fifo)], "is not a regular file"),
        ([*RUN, "--model", "/dev/zero"], "is not a regular file"),
        ([*RUN, "--model", "tiny-moe", "--cluster", str(fifo)], "is not a regular file"),
        ([*RUN, "--model", "tiny-moe", "--cluster", str(bomb)], "aliases expand"),
        (
            [*RUN, "--model", "tiny-moe", "--cluster", str(work / "regular.yaml" / "c.yaml")],
            "Not a directory",
        ),
        ([*RUN, "--plan", "/dev/urandom"], "is not a regular file"),
        ([*RUN, "--model", "tiny-moe", "--seq-len", "0"], "seq_len"),
        ([*RUN, "--model", "tiny-moe", "--gbs", "1" + "0" * 400], "global_batch"),
        ([*RUN, "--model", "tiny-moe", "-o", str(fifo)], "not a regular file"),
        ([*RUN, "--model", "tiny-moe", "-o", "/dev/null"], "not a regular file"),
        ([*RUN, "--model", "tiny-moe", "-o", "/proc/version"], "/proc/version"),
        (["probe", "--nproc", "2", "--budget", "-1"], "--budget"),
        (["probe", "--nproc", "2", "--budget", "nan"], "--budget"),
        (["probe", "--nproc", "2", "--budget", "inf"], "--budget"),
        (["probe", "--nproc", "2", "--budget", "1e400"], "--budget"),
        (["probe", "--nproc", "2", "-o", str(fifo)], "not a regular file"),
        (["probe", "--nproc", "2", "-o", str(work / "regular.yaml" / "p.yaml")], "Not a directory"),
    ]


RUN_CASES = list(range(17))
"""The entries of ``_run_inputs`` (made per test: they need its folder)."""


@pytest.mark.slow
@pytest.mark.parametrize("index", RUN_CASES)
def test_run_and_probe_refuse_before_any_rank_starts(index: int, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "regular.yaml").write_text("a: 1\n")
    args, word = _run_inputs(work)[index]
    before = tree(work)
    stderr = subprocess_refused(args, work)
    assert flat(word) in flat(stderr), stderr
    assert tree(work) == before


def _in_private_mount(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("needs root on Linux for a private mount namespace (unshare -m)")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -m is not permitted here: {probe.stderr.decode().strip()}")
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=30, cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mount", "rule"),
    [
        ("mount --bind -o ro {dir} {dir}", "Read-only file system"),  # a read-only folder, even for root
        ("mount -t tmpfs -o size=4k tmpfs {dir}", "No space left on device"),  # a full file system
    ],
    ids=["read-only", "full"],
)
def test_a_write_that_fails_exits_2_and_leaves_nothing(mount: str, rule: str, tmp_path: Path) -> None:
    """``solve -o`` into a read-only folder is refused before the search; into a file system with no room
    for the plan (4 KiB: the plan is larger) it fails at the write, leaving no partial file. The mounts live
    in the test's own mount namespace and end with it."""
    folder = tmp_path / "target"
    folder.mkdir()
    python = f"{sys.executable} -m planner solve --model tiny-moe --cluster v100-pcie -o {folder}/plan.json"
    done = _in_private_mount(
        f"{mount.format(dir=folder)} && {{ {python}; echo rc=$?; ls -A {folder}; }}", tmp_path
    )
    assert "rc=2" in done.stdout, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and flat(rule) in flat(done.stderr), done.stderr
    assert done.stdout.strip().endswith("rc=2"), f"left behind: {done.stdout}"
