"""Checkpoints, resume and a dead rank, as a user meets them with `moeplan run`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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
    checkpoints = tmp_path / "ck"
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "planner",
            *COMMON,
            "--steps",
            "1000",
            "--timeout",
            str(timeout),
            "--checkpoint-dir",
            str(checkpoints),
            "--checkpoint-every",
            "2",
            "--json",
        ],  # fmt: skip
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 180
        while not (checkpoints / "latest").exists():
            assert job.poll() is None and time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        pid = _rank_pid(str(checkpoints), 2)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        _, stderr = job.communicate(timeout=timeout + 60)
        elapsed = time.time() - killed
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
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
