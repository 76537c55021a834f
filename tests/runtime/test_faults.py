"""Checkpoints, resume and a dead rank, as a user meets them with `moeplan run`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.dist, pytest.mark.slow]

COMMON = [
    "run",
    "--model",
    "tiny-moe",
    "--nproc",
    "4",
    "--ep",
    "2",
    "--ranks-per-node",
    "2",
    "--seq-len",
    "32",
]


def moeplan(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "planner", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip


def losses(done: subprocess.CompletedProcess[str]) -> dict[int, float]:
    assert done.returncode == 0, done.stderr[-3000:]
    return {s["step"]: s["loss"] for s in json.loads(done.stdout)["steps"]}


def test_resume_continues_the_same_loss_curve(tmp_path: Path) -> None:
    full = losses(moeplan(*COMMON, "--steps", "6", "--json", cwd=tmp_path))
    first = losses(moeplan(*COMMON, "--steps", "3", "--checkpoint-dir", "ck", "--checkpoint-every", "3", "--json",
                           cwd=tmp_path))  # fmt: skip
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step-000002"
    assert not list((tmp_path / "ck").glob(".*partial"))
    rest = losses(
        moeplan(*COMMON, "--steps", "6", "--checkpoint-dir", "ck", "--resume", "--json", cwd=tmp_path)
    )
    assert sorted(first) == [0, 1, 2] and sorted(rest) == [3, 4, 5]
    assert {**first, **rest} == pytest.approx(full, rel=1e-6)


def _rank_pid(marker: str, rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if "planner.runtime.train" in cmdline and marker in cmdline and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


def test_a_killed_rank_ends_the_job_and_the_run_resumes(tmp_path: Path) -> None:
    timeout = 10
    with long_run(tmp_path, timeout) as (job, checkpoints):
        pid = _rank_pid(str(checkpoints), 2)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        _, stderr = job.communicate(timeout=timeout + 60)
        elapsed = time.time() - killed
    assert job.returncode == 5, stderr[-2000:]
    assert "rank 2 exited" in stderr
    assert elapsed < timeout + 20
    saved = int((checkpoints / "latest").read_text().strip().removeprefix("step-"))
    resumed = losses(moeplan(*COMMON, "--steps", str(saved + 3), "--checkpoint-dir", str(checkpoints), "--resume",
                             "--json", cwd=tmp_path))  # fmt: skip
    reference = losses(moeplan(*COMMON, "--steps", str(saved + 3), "--json", cwd=tmp_path))
    assert resumed == pytest.approx({s: reference[s] for s in resumed}, rel=1e-6)


def _descendants(pid: int) -> set[int]:
    """``pid`` and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        found.add(current)
        todo += children.get(current, [])
    return found


@pytest.mark.skipif(not Path("/usr/bin/ss").exists() and not Path("/bin/ss").exists(), reason="no ss")
def test_a_local_run_listens_on_loopback_only() -> None:
    """Every socket a local run's ranks listen on is 127.0.0.1 (issue 19 item 5): they meet in a file
    store, and gloo binds lo."""
    job = subprocess.Popen(
        [sys.executable, "-m", "planner", "run", "--model", "tiny-moe", "--nproc", "2", "--steps", "200"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    seen: list[str] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and job.poll() is None and len(seen) < 2:
            pids = _descendants(job.pid)
            listing = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
            seen = [line.split()[3] for line in listing if any(f"pid={pid}," in line for pid in pids)]
            time.sleep(0.5)
    finally:
        job.kill()
        job.wait()
    assert seen, "the run's ranks were never seen listening"
    assert all(address.startswith(("127.0.0.1:", "[::1]:")) for address in seen), seen


@contextlib.contextmanager
def long_run(tmp_path: Path, timeout: int) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A run of many steps, yielded once it has written a checkpoint (its ranks are training); killed, and
    its pipes closed, on the way out whatever the test did."""
    checkpoints = tmp_path / "ck"
    job = subprocess.Popen(
        [sys.executable, "-m", "planner", *COMMON, "--steps", "100000", "--timeout", str(timeout),
         "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "2"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    with job:
        try:
            deadline = time.time() + 180
            while not (checkpoints / "latest").exists():
                assert job.poll() is None, (
                    f"the run ended before its first checkpoint: {job.communicate()[1][-2000:]}"
                )
                assert time.time() < deadline, "no checkpoint appeared in 180 s"
                time.sleep(0.2)
            yield job, checkpoints
        finally:
            if job.poll() is None:
                job.kill()
            if job.stdout is not None and not job.stdout.closed:
                job.communicate()


def _alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (a zombie counts as gone)."""
    out = set()
    for pid in pids:
        try:
            state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            out.add(pid)
    return out


def test_a_stopped_rank_ends_the_job_naming_it(tmp_path: Path) -> None:
    """A rank that stops (SIGSTOP: a hung host looks the same) ends the job with exit 5 within --timeout +
    10 s, the error naming that rank, and no rank is left behind (issue 19 item 5)."""
    timeout = 30
    with long_run(tmp_path, timeout) as (job, checkpoints):
        pid = _rank_pid(str(checkpoints), 2)
        assert pid is not None
        ranks = _descendants(job.pid) - {job.pid}
        os.kill(pid, signal.SIGSTOP)
        stopped = time.time()
        try:
            _, stderr = job.communicate(timeout=timeout + 60)
        finally:
            with contextlib.suppress(ProcessLookupError):  # the launcher has killed it: the expected end
                os.kill(pid, signal.SIGCONT)
        elapsed = time.time() - stopped
    assert job.returncode == 5, stderr[-2000:]
    assert "rank 2 stopped responding" in " ".join(stderr.split()), stderr[-2000:]
    assert elapsed <= timeout + 10, elapsed
    time.sleep(1)
    assert not _alive(ranks), "ranks outlived the job"


def test_sigterm_to_the_launcher_stops_every_rank(tmp_path: Path) -> None:
    """SIGTERM to ``moeplan run`` stops every rank within 2 s, removes its temporary folder, exit 143."""
    with long_run(tmp_path, 60) as (job, _):
        ranks = _descendants(job.pid) - {job.pid}
        assert len(ranks) == 4 and list(tmp_path.glob("moeplan-run-*"))
        job.send_signal(signal.SIGTERM)
        _, stderr = job.communicate(timeout=30)
    time.sleep(2)
    assert job.returncode == 143, stderr[-2000:]
    assert not _alive(ranks), "ranks outlived the launcher by 2 s"
    assert not list(tmp_path.glob("moeplan-run-*")), "the run's temporary folder was left behind"


def test_ranks_end_when_their_launcher_is_killed(tmp_path: Path) -> None:
    """SIGKILL to the launcher (it can do nothing): each rank sees its parent gone at its next heartbeat."""
    with long_run(tmp_path, 60) as (job, _):
        ranks = _descendants(job.pid) - {job.pid}
        job.kill()
    deadline = time.time() + 5
    while _alive(ranks) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(ranks), "ranks outlived a killed launcher by 5 s"
