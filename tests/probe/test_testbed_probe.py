"""`moeplan probe --testbed` against the ground truth it was built for: the configured link rate.

The testbed shapes each node's link (both directions) to the configured rate and the node's ranks share
it, so the probe's per-rank inter-node bus bandwidth times the ranks per node must come back as that
rate. ``node_bandwidth_gbps`` of ``--json`` is exactly that product (``planner/probe/build.py``).
Root only (network namespaces); slow (one probe per rate).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from planner.catalog import load_cluster
from planner.execution import testbed
from tests.probe.test_testbed import _host_has_testbed

pytestmark = [pytest.mark.slow, pytest.mark.dist]

RANKS_PER_NODE = 2
BUDGET_S = 90
"""Enough for the inter-node series to reach several MiB: the fit takes its bandwidth from the largest sizes."""
TOLERANCE = 0.15
ATTEMPTS = 2
"""A second probe when the first reads outside the tolerance. On a shared 2-core host other work slows
ranks down at random, and the fit's bandwidth is a slope over the two largest sizes: a slowed largest
size reads low, a slowed second-largest flattens the slope and reads high (+19.6% at 200 Mbit/s in one
CI run, -2..-4% in the runs around it). Both directions are noise, so both get the second probe."""


@pytest.fixture
def bed_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root: the testbed creates network namespaces")
    if _host_has_testbed():
        pytest.skip("a testbed is already up on this host; not touching it")
    monkeypatch.setenv(testbed.STATE_DIR_ENV, str(tmp_path / "state"))
    try:
        yield tmp_path
    finally:
        testbed.down()


def moeplan(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "planner", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _probe(cwd: Path) -> dict[str, object]:
    done = moeplan("probe", "--testbed", "--budget", str(BUDGET_S), "-o", "bed.yaml", "--json", cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    summary: dict[str, object] = json.loads(done.stdout)
    return summary


# Rates where the link, not the CPU, is the bottleneck: at 400 Mbit/s four gloo ranks on a 2-core host
# read 3% low in some runs and 17-22% low in another (CPU-bound ranks, not the shaper or the fit).
@pytest.mark.parametrize("mbit", [100, 150, 200])
def test_probe_finds_the_nodes_and_the_configured_rate(bed_host: Path, mbit: int) -> None:
    up = moeplan("testbed", "up", "--nodes", "2", "--ranks-per-node", str(RANKS_PER_NODE),
                 "--inter-node-mbit", str(mbit), cwd=bed_host)  # fmt: skip
    assert up.returncode == 0, up.stderr
    configured_gbps = mbit * 1e6 / 8 / 1e9
    readings = []
    for _attempt in range(ATTEMPTS):
        summary = _probe(bed_host)
        assert (summary["nodes"], summary["ranks"], summary["ranks_per_node"]) == (2, 4, RANKS_PER_NODE)
        assert summary["elapsed_s"] <= BUDGET_S  # type: ignore[operator]
        links = {link["class"]: link for link in summary["links"]}  # type: ignore[attr-defined]
        assert set(links) == {"intra_node", "inter_node"}
        # Loopback inside a namespace is far faster than the shaped link: the classes were told apart.
        assert links["intra_node"]["bandwidth_gbps"] > 5 * links["inter_node"]["bandwidth_gbps"]
        error = links["inter_node"]["node_bandwidth_gbps"] / configured_gbps - 1
        readings.append(round(error, 3))
        if abs(error) < TOLERANCE:
            break
    print(f"{mbit} Mbit/s: relative error of the inter-node fit per attempt {readings}")
    assert -TOLERANCE < readings[-1] < TOLERANCE, readings

    profile = load_cluster(str(bed_host / "bed.yaml"))
    assert profile.num_nodes == 2 and profile.num_gpus_per_node == RANKS_PER_NODE
    assert [host.split()[-1] for host in profile.provenance.hosts] == ["(198.18.0.1)", "(198.18.0.2)"]
    solved = moeplan("solve", "--cluster", "bed.yaml", "--model", "tiny-moe", "--seq-len", "512", "--gbs", "16",
                     "--json", cwd=bed_host)  # fmt: skip
    assert solved.returncode == 0, solved.stderr


def test_run_on_the_testbed_counts_what_the_kernel_saw(bed_host: Path) -> None:
    up = moeplan(
        "testbed", "up", "--nodes", "2", "--ranks-per-node", "2", "--inter-node-mbit", "1000", cwd=bed_host
    )
    assert up.returncode == 0, up.stderr
    done = moeplan("run", "--testbed", "--model", "tiny-moe", "--ep", "4", "--dispatcher", "hierarchical",
                   "--steps", "2", "--seq-len", "32", "--json", cwd=bed_host)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    counted = report["bytes_per_link_class"]["inter_node"] * len(report["steps"])
    kernel = sum(report["interface_tx_bytes"].values())
    # The kernel sees everything that left the nodes: the runtime's payload plus headers, the rendezvous
    # and process-group set-up; never less than the runtime counted.
    assert counted > 0 and kernel >= counted
    print(f"inter-node bytes: runtime {counted / 2**20:.1f} MiB, kernel counters {kernel / 2**20:.1f} MiB")
