"""From a probe's record to a cluster profile, on synthetic records with known link figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from planner.catalog import load_cluster, load_gpu
from planner.errors import ExecutionError, SpecError
from planner.probe.bandwidth import BENCH_KINDS, algbw_gbps, bus_factor, busbw_gbps
from planner.probe.build import build_profile, catalog_gpu_for, nccl_tests_table, probe_summary
from planner.probe.results import (
    DeviceMeasurements,
    GemmPoint,
    Measurement,
    ProbeResults,
    RankIdentity,
    group_into_nodes,
)
from planner.topology import build_topology
from planner.workflows.probe import write_profile

# Per scope: (latency s, busbw GB/s) the synthetic links have.
LINKS = {"intra_node": (40e-6, 0.8), "inter_node": (300e-6, 0.0125), "world": (400e-6, 0.02)}


def _points(scope: str, n: int, groups: int) -> list[Measurement]:
    latency, busbw = LINKS[scope]
    points = []
    for kind in BENCH_KINDS:
        for size in (2**k for k in range(10, 24, 2)):
            seconds = latency + size * bus_factor(kind, n) / (busbw * 1e9)
            points.append(
                Measurement(
                    scope=scope,  # type: ignore[arg-type]
                    kind=kind,
                    group_size=n,
                    groups=groups,
                    size_bytes=size,
                    seconds=seconds,
                    iterations=5,
                    algbw_gbps=algbw_gbps(size, seconds),
                    busbw_gbps=busbw_gbps(kind, n, size, seconds),
                )
            )
    return points


def _device(kind: str = "cpu", name: str = "Test CPU") -> DeviceMeasurements:
    rate, t0 = 0.05e12, 3e-6  # 50 GFLOP/s sustained, 3 us per GEMM
    shapes = [(128, 128, 128), (256, 256, 256), (512, 512, 512), (1024, 1024, 1024)]
    return DeviceMeasurements(
        kind=kind,  # type: ignore[arg-type]
        name=name,
        dtype="float32",
        threads=1,
        gemm=tuple(GemmPoint(m=m, n=n, k=k, seconds=t0 + 2 * m * n * k / rate) for m, n, k in shapes),
        attention_fwd_tflops=0.02,
        attention_bwd_tflops=0.015,
        memory_copy_gbps=7.0,
        memory_gib=5.5,
        host_overhead_us=1.5,
        attention_shape="1x8x512x64",
    )


def _results(nodes: int = 2, per_node: int = 2, device: DeviceMeasurements | None = None) -> ProbeResults:
    ranks = [(node, local) for node in range(nodes) for local in range(per_node)]
    identities = tuple(
        RankIdentity(
            rank=r, hostname="bed", address=f"198.18.0.{node + 1}", device="cpu", device_name="Test CPU"
        )
        for r, (node, _local) in enumerate(ranks)
    )
    measurements = []
    if per_node > 1:
        measurements += _points("intra_node", per_node, nodes)
    if nodes > 1:
        measurements += _points("inter_node", nodes, per_node)
        if per_node > 1:
            measurements += _points("world", nodes * per_node, 1)
    return ProbeResults(
        command="moeplan probe --testbed",
        date="2026-11-23",
        backend="gloo",
        world_size=nodes * per_node,
        budget_s=60,
        elapsed_s=42.0,
        identities=identities,
        nodes=tuple(tuple(range(n * per_node, (n + 1) * per_node)) for n in range(nodes)),
        measurements=tuple(measurements),
        device=device or _device(),
        library_versions={"torch": "2.13.0"},
        interface="eth0",
    )


def test_fits_recover_the_links_and_the_device() -> None:
    profile = build_profile(_results(), "bed")
    assert (profile.num_nodes, profile.num_gpus_per_node) == (2, 2)
    for scope in ("intra_node", "inter_node"):
        latency, busbw = LINKS[scope]
        for fit in profile.links[scope].collectives.values():  # type: ignore[index]
            assert fit.bandwidth_gbps == pytest.approx(busbw, rel=1e-4)
            assert fit.latency_us == pytest.approx(latency * 1e6, rel=1e-3)
            assert "moeplan probe 2026-11-23" in fit.source and "rms error" in fit.source
    assert profile.gpu.peak_tflops.bf16 == pytest.approx(0.05, rel=1e-4)
    assert profile.gpu.efficiency is not None
    assert profile.gpu.efficiency.gemm_overhead_us == pytest.approx(3.0, rel=1e-2)
    assert profile.gpu.efficiency.attention_fwd_fraction == pytest.approx(0.4, rel=1e-3)
    assert profile.host_overhead_us == 1.5
    assert profile.provenance.kind == "probe"
    assert profile.provenance.hosts == ("bed (198.18.0.1)", "bed (198.18.0.2)")


def test_summary_reports_per_rank_and_per_node_bandwidth() -> None:
    results = _results()
    summary = probe_summary(results, build_profile(results, "bed"))
    assert (summary["nodes"], summary["ranks"]) == (2, 4)
    links = {link["class"]: link for link in summary["links"]}
    assert set(links) == {"intra_node", "inter_node"}
    assert links["inter_node"]["bandwidth_gbps"] == pytest.approx(0.0125, rel=1e-4)
    assert links["inter_node"]["node_bandwidth_gbps"] == pytest.approx(0.025, rel=1e-4)
    assert links["intra_node"]["latency_us"] == pytest.approx(40, rel=1e-3)
    assert links["inter_node"]["bandwidth_from"] in BENCH_KINDS
    assert set(links["inter_node"]["collectives"]) == set(BENCH_KINDS)
    json.dumps(summary)  # plain JSON


def test_profile_written_is_a_cluster_solve_can_load(tmp_path: Path) -> None:
    profile = build_profile(_results(), "bed")
    written = write_profile(profile, tmp_path / "p.yaml")
    assert written[0] == tmp_path / "p.yaml" and written[1].name == "last-probe.yaml"
    loaded = load_cluster(str(tmp_path / "p.yaml"))
    assert loaded == profile
    graph = build_topology(loaded)
    gpus = [v for v, d in graph.nodes(data=True) if d["kind"] == "gpu"]
    assert len(gpus) == 4
    assert graph.edges["n1/gpu0", "fabric"]["link_class"] == "inter_node"
    assert graph.nodes["n1"]["address"] == "198.18.0.2"
    assert not list(tmp_path.glob("*.tmp*"))


def test_single_node_profile_has_no_inter_node_link() -> None:
    profile = build_profile(_results(nodes=1, per_node=4), "one")
    assert set(profile.links) == {"intra_node"}
    assert profile.num_gpus_per_node == 4


def test_one_rank_per_node_cannot_measure_intra_node() -> None:
    with pytest.raises(SpecError, match="at least 2 ranks on each node"):
        build_profile(_results(nodes=2, per_node=1), "x")


def test_too_few_sizes_is_a_clear_error() -> None:
    results = _results()
    short = tuple(m for m in results.measurements if not (m.kind == "send_recv" and m.size_bytes > 1024))
    with pytest.raises(SpecError, match="send_recv.*larger --budget"):
        build_profile(results.model_copy(update={"measurements": short}), "x")


def test_gpu_device_uses_the_catalog_peak() -> None:
    h100 = load_gpu("H100-SXM")
    results = _results(device=_device("cuda", "NVIDIA H100 80GB HBM3"))
    profile = build_profile(results, "gpu", h100)
    assert profile.gpu.peak_tflops == h100.peak_tflops
    assert profile.gpu.efficiency is not None
    assert profile.gpu.efficiency.gemm_fraction_bf16 == pytest.approx(
        0.05 / (h100.peak_tflops.bf16 or 1), rel=1e-3
    )
    with pytest.raises(SpecError, match="--gpu NAME"):
        build_profile(results, "gpu", None)


@pytest.mark.parametrize(
    ("device_name", "catalog"),
    [
        ("NVIDIA H100 80GB HBM3", "H100-SXM"),
        ("NVIDIA H100 PCIe", None),
        ("NVIDIA H200", "H200-SXM"),
        ("NVIDIA H800", "H800-SXM"),
        ("NVIDIA A100-SXM4-80GB", "A100-SXM-80GB"),
        ("NVIDIA A100-SXM4-40GB", "A100-SXM-40GB"),
        ("NVIDIA A800-SXM4-80GB", "A800-SXM-80GB"),
        ("Tesla V100-SXM2-32GB", "V100-SXM2-32GB"),
        ("Tesla V100-PCIE-16GB", "V100-PCIe-16GB"),
        ("NVIDIA B200", "B200"),
        ("NVIDIA GB200", "GB200"),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_catalog_gpu_for_cuda_names(device_name: str, catalog: str | None) -> None:
    assert catalog_gpu_for(device_name) == catalog
    if catalog:
        load_gpu(catalog)


def test_nccl_tests_table_layout() -> None:
    table = nccl_tests_table(_results())
    assert "# all_reduce on inter_node: 2 group(s) of 2 ranks" in table
    header = [line for line in table.splitlines() if "algbw" in line][0]
    assert header.split() == ["#", "size", "count", "type", "redop", "root", "time", "algbw", "busbw"]
    block = next(b for b in table.split("\n\n") if b.startswith("# all_reduce on intra_node"))
    row = next(line for line in block.splitlines() if line.strip().startswith("4096 "))
    assert row.split()[:5] == ["4096", "1024", "float", "sum", "-1"]
    assert table.count("# Avg bus bandwidth") == 3 * len(BENCH_KINDS)


def _identity(rank: int, host: str, address: str) -> RankIdentity:
    return RankIdentity(rank=rank, hostname=host, address=address, device="cpu", device_name="c")


def test_nodes_come_from_host_identity_not_rank_numbers() -> None:
    # Round-robin placement: ranks 0 and 2 on host a, 1 and 3 on host b.
    ids = [_identity(0, "a", "10.0.0.1"), _identity(1, "b", "10.0.0.2"), _identity(2, "a", "10.0.0.1"),
           _identity(3, "b", "10.0.0.2")]  # fmt: skip
    assert group_into_nodes(ids) == ((0, 2), (1, 3))
    # Two namespaces on one host are two nodes.
    ids = [_identity(0, "h", "198.18.0.1"), _identity(1, "h", "198.18.0.2")]
    assert group_into_nodes(ids) == ((0,), (1,))


def test_unequal_nodes_are_refused() -> None:
    ids = [_identity(0, "a", "x"), _identity(1, "a", "x"), _identity(2, "b", "y")]
    with pytest.raises(ValueError, match="different numbers of ranks"):
        group_into_nodes(ids)


def test_gpu_nodes_carry_nvlink_nic_and_numa_from_nvidia_smi() -> None:
    topo = (Path(__file__).parent.parent / "data" / "nvtopo" / "h100_8gpu_nv18_nic_legend.txt").read_text()
    results = _results(nodes=2, per_node=8, device=_device("cuda", "NVIDIA H100 80GB HBM3"))
    results = results.model_copy(update={"nvidia_smi_topo": {0: topo, 1: topo}})
    profile = build_profile(results, "dgx", load_gpu("H100-SXM"))
    graph = build_topology(profile)
    assert graph.edges["n0/gpu0", "n0/gpu1"]["nvlinks"] == 18
    assert graph.nodes["n1/gpu3"]["rank"] == 11
    assert graph.nodes["n0/gpu0"]["numa_node"] is not None
    assert len(profile.nic_affinity) == 8
    nics = [v for v, d in graph.nodes(data=True) if d["kind"] == "nic" and graph.degree(v) > 0]
    assert nics and all(v.startswith(("n0/", "n1/")) for v in nics)


def test_timings_that_fall_with_size_are_a_probe_failure_not_a_traceback() -> None:
    # A busy host: the second-largest GEMM took longer than the largest, so no rate can be fitted.
    device = _device()
    slowed = (*device.gemm[:2], device.gemm[2].model_copy(update={"seconds": 1.0}), device.gemm[3])
    with pytest.raises(ExecutionError, match="float32 GEMM timings give no fit.*idle host"):
        build_profile(_results(device=device.model_copy(update={"gemm": slowed})), "bed")


def test_a_gpu_probe_gives_the_host_figures_offload_needs_and_a_cpu_probe_none() -> None:
    # GPUs: the node's memory, the pinned copy bandwidth, and the host copy bandwidth of every rank at once.
    gpu = _device("cuda", "NVIDIA H100 80GB HBM3").model_copy(
        update={"host_memory_gib": 2015.6, "host_memory_copy_gbps": 40.0, "host_device_copy_gbps": 17.5}
    )
    profile = build_profile(_results(per_node=4, device=gpu), "gpu", load_gpu("H100-SXM"))
    assert profile.host is not None
    assert (profile.host.memory_gib, profile.host.device_copy_gbps) == (2015.6, 17.5)
    assert profile.host.memory_gbps == pytest.approx(160.0)  # 4 ranks copying at once
    # CPU ranks have no device to offload from: the figures are recorded, the profile has no host.
    cpu = _device().model_copy(update={"host_memory_gib": 23.4, "host_memory_copy_gbps": 9.0})
    assert build_profile(_results(device=cpu), "bed").host is None


def test_the_host_figures_are_measured_on_this_machine() -> None:
    from planner.probe.device import _host_device_copy_gbps, _host_memory_copy_gbps

    assert _host_memory_copy_gbps(ranks_per_node=2, seconds=0.05) > 0.1
    assert _host_device_copy_gbps(torch.device("cpu"), 0.05) is None
