"""From a probe's record to a cluster profile: alpha-beta fits per link class, the device, the graph.

- **Links.** For each link class (``intra_node``: the ranks of a node; ``inter_node``: same-local-rank
  peers across nodes, every such group at once) and each collective kind, ``planner/probe/fit.py`` fits
  ``t = latency + S x factor / busbw`` to every size timed. Inter-node groups run concurrently, so the
  fitted figure is what each rank gets while all ranks of its node use the network, which is what the
  cost model means by a per-GPU bandwidth (``planner/costmodel/comm.py``); where ranks share one NIC
  (the testbed, or a node with fewer NICs than GPUs) the node's NIC carries ``ranks_per_node`` times it.
- **Device.** GPUs keep their datasheet peaks from the hardware catalog; the probe measures the
  achieved fractions (GEMM fit ``t0 + F / (fraction x peak)`` over shapes, attention, copy bandwidth) and
  the host's launch overhead. A CPU has no tensor-core datasheet: its "peak" is the measured sustained
  float32 GEMM rate (fraction 1 by construction), and its memory is the host's shared among the ranks.
- **Graph.** Nodes, ranks and measured links as networkx node-link data (``planner/topology.py``'s
  vertex names), with NVLink/PCIe/NIC detail from ``nvidia-smi topo -m`` where GPUs exist.

A series whose timings give no fit (a busy host: time falling as sizes grow) is skipped when the profile
does not need it (all_to_all_v, which only ``--json`` reports); the profile then says so in
``provenance.warnings``. When a series it needs gives no fit (one of the five collectives of a link
class, or the GEMMs) there is no profile to write: ExecutionError (exit 5) naming every such series.
A fit above ``POOR_FIT_RMS`` is kept, with its rms error, and listed in the warnings too.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx

from planner.errors import ExecutionError, SpecError
from planner.probe.bandwidth import bus_factor
from planner.probe.fit import POOR_FIT_RMS, AlphaBeta, fit_alpha_beta
from planner.probe.nvtopo import add_node_to_graph, nic_affinity, parse_topo_matrix
from planner.probe.results import Measurement, ProbeResults, Scope
from planner.schema import (
    COLLECTIVE_KINDS,
    AlphaBetaFit,
    ClusterProfile,
    ComputeEfficiency,
    GpuSpec,
    HostSpec,
    LinkClass,
    NicAffinity,
    PeakTflops,
    Provenance,
)

__all__ = ["LinkFits", "build_profile", "catalog_gpu_for", "link_fits", "nccl_tests_table", "probe_summary"]

_CATALOG_MATCH: tuple[tuple[tuple[str, ...], tuple[str, ...], str], ...] = (
    # (all of these words, none of these, catalog name), first match wins; words as torch.cuda.get_device_name
    # prints them, e.g. "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "Tesla V100-PCIE-16GB".
    (("GB300",), (), "GB300"),
    (("GB200",), (), "GB200"),
    (("B200",), ("GB200",), "B200"),
    (("H200",), ("NVL",), "H200-SXM"),
    (("H800",), ("PCIE",), "H800-SXM"),
    (("H100",), ("PCIE", "NVL"), "H100-SXM"),
    (("A800", "80GB"), ("PCIE",), "A800-SXM-80GB"),
    (("A100", "80GB"), ("PCIE",), "A100-SXM-80GB"),
    (("A100", "40GB"), ("PCIE",), "A100-SXM-40GB"),
    (("V100", "32GB"), ("PCIE",), "V100-SXM2-32GB"),
    (("V100", "PCIE", "16GB"), (), "V100-PCIe-16GB"),
)


def catalog_gpu_for(device_name: str) -> str | None:
    """The hardware catalog's name for a GPU as CUDA names it, or None when the catalog lacks it."""
    upper = device_name.upper()
    for needed, excluded, name in _CATALOG_MATCH:
        if all(word in upper for word in needed) and not any(word in upper for word in excluded):
            return name
    return None


def _series(results: ProbeResults, scope: Scope, kind: str) -> list[Measurement]:
    return sorted(
        (m for m in results.measurements if m.scope == scope and m.kind == kind), key=lambda m: m.size_bytes
    )


def _fitted(x: list[float], seconds: list[float]) -> AlphaBeta | str:
    """The alpha-beta fit of one timed series, or why its timings give none."""
    try:
        return fit_alpha_beta(x, seconds)
    except (ValueError, ArithmeticError) as error:
        return str(error)


@dataclass(frozen=True)
class LinkFits:
    """The fit of every collective kind timed on one scope, and each kind whose timings gave none."""

    fits: dict[str, AlphaBeta]
    unfitted: dict[str, str]
    """Kind -> why its timings give no fit."""


def link_fits(results: ProbeResults, scope: Scope) -> LinkFits:
    """The alpha-beta fit of every collective kind timed on ``scope`` (all_to_all_v included); a kind timed
    at fewer than two sizes is in neither (``_check_sizes`` refuses the record)."""
    fits: dict[str, AlphaBeta] = {}
    unfitted: dict[str, str] = {}
    kinds = {m.kind for m in results.measurements if m.scope == scope}
    for kind in sorted(kinds):
        points = _series(results, scope, kind)
        if len({p.size_bytes for p in points}) < 2:
            continue
        x = [p.size_bytes * bus_factor(p.kind, p.group_size) for p in points]
        fit = _fitted(x, [p.seconds for p in points])
        if isinstance(fit, str):
            unfitted[kind] = fit
        else:
            fits[kind] = fit
    return LinkFits(fits, unfitted)


def _check_sizes(results: ProbeResults, scope: Scope) -> None:
    """SpecError when a collective the profile needs was timed at fewer than two sizes (a probe times at
    least ``MIN_POINTS``, so only a record cut short or edited by hand has so few)."""
    missing = [
        kind for kind in COLLECTIVE_KINDS if len({p.size_bytes for p in _series(results, scope, kind)}) < 2
    ]
    if missing:
        raise SpecError(
            f"the probe timed too few sizes of {', '.join(missing)} on the {scope} link to fit a bandwidth; "
            "give it a larger --budget"
        )


def _gemm_fit(results: ProbeResults) -> AlphaBeta | str:
    """The device's ``t0 + F / R`` fit over its GEMM shapes, or why its timings give none."""
    device = results.device
    return _fitted([p.flops for p in device.gemm], [p.seconds for p in device.gemm])


def _needed_fits(results: ProbeResults, scopes: dict[Scope, LinkFits], gemm: AlphaBeta | str) -> AlphaBeta:
    """The GEMM fit once every series the profile needs has a fit; else ExecutionError naming every one
    that has none, with the sizes it reached (all at once, so that one rerun can be judged on all)."""
    by_reason: dict[tuple[str, str], list[str]] = {}
    for scope, fitted in scopes.items():
        for kind, why in fitted.unfitted.items():
            if kind in COLLECTIVE_KINDS:
                series = f"{kind} ({_size_range(_series(results, scope, kind))})"
                by_reason.setdefault((f" on the {scope} link", why), []).append(series)
    if isinstance(gemm, str):
        by_reason[("", gemm)] = [f"{results.device.dtype} GEMM"]
    if by_reason:
        failed = [
            f"{', '.join(series)}{where} timings give no fit ({why})"
            for (where, why), series in by_reason.items()
        ]
        raise ExecutionError(
            f"the probe's {'; '.join(failed)}. A cluster profile needs each of them, so none was written. A "
            "short --budget stops a series after a few small sizes, where time hardly grows with size, and "
            "other work on the host slows some sizes more than others: rerun the probe with a larger "
            "--budget, or on an idle host."
        )
    assert not isinstance(gemm, str)
    return gemm


def _warnings(scopes: dict[Scope, LinkFits], gemm: AlphaBeta, dtype: str) -> tuple[str, ...]:
    """One line per series skipped and per fit above ``POOR_FIT_RMS`` (called once ``_needed_fits`` has
    passed, so every series left without a fit is one the profile does not need)."""
    lines = [
        f"skipped {kind} on the {scope} link: its timings give no fit ({why}); the profile does not use "
        "it, and --json lists no fit for it"
        for scope, fitted in scopes.items()
        for kind, why in fitted.unfitted.items()
    ]
    poor = [
        (f"{kind} on the {scope} link", fit)
        for scope, fitted in scopes.items()
        for kind, fit in fitted.fits.items()
        if fit.poor
    ]
    if gemm.poor:
        poor.append((f"the {dtype} GEMM rate", gemm))
    lines += [
        f"poor fit of {what}: rms error {fit.rms_relative_error:.1%}, above {POOR_FIT_RMS:.0%}, so its "
        "figures misprice a typical size by about that much; an idle host or a larger --budget gives "
        "steadier timings"
        for what, fit in poor
    ]
    return tuple(lines)


def _size_range(points: Sequence[Measurement]) -> str:
    def human(n: int) -> str:
        for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
            if n >= scale:
                return f"{n / scale:g} {unit}"
        return f"{n} B"

    return f"{len(points)} sizes {human(points[0].size_bytes)}-{human(points[-1].size_bytes)}"


def _medium(results: ProbeResults, scope: Scope) -> str:
    if results.backend == "gloo":
        if scope == "intra_node":
            return "gloo over TCP within a host (loopback)"
        return f"gloo over TCP between hosts (interface {results.interface or 'chosen by gloo'})"
    if scope == "intra_node":
        return "NCCL within a node (NVLink/PCIe as nvidia-smi topo reports)"
    return "NCCL between nodes (the network)"


def _link_class(results: ProbeResults, scope: Scope, fits: dict[str, AlphaBeta]) -> LinkClass:
    first = next(m for m in results.measurements if m.scope == scope)
    where = (
        f"{first.groups} group(s) of {first.group_size} ranks at once"
        + (", same local rank on each node" if scope == "inter_node" else ", one per node")
        if scope != "world"
        else "every rank"
    )
    collectives = {}
    for kind in COLLECTIVE_KINDS:
        fit = fits[kind]
        points = _series(results, scope, kind)
        collectives[kind] = AlphaBetaFit(
            latency_us=round(fit.latency_us, 3),
            bandwidth_gbps=float(f"{fit.bandwidth_gbps:.6g}"),
            source=(
                f"moeplan probe {results.date}: {results.backend} {kind} on {where}, {_size_range(points)}, "
                f"mean of back-to-back runs, slowest rank; relative least-squares fit, "
                f"rms error {fit.rms_relative_error:.1%}"
                + (" (poor: see provenance.warnings)" if fit.poor else "")
            ),
            rms_relative_error=round(fit.rms_relative_error, 4),
        )
    best = max(m.busbw_gbps for m in results.measurements if m.scope == scope)
    return LinkClass(
        medium=_medium(results, scope),
        nominal_gbps=float(f"{best:.6g}"),
        collectives=collectives,
        source=(
            f"moeplan probe {results.date} on {', '.join(_hosts(results))}. The probe knows no line rate: "
            "nominal_gbps is the best bus bandwidth it measured on this link."
        ),
    )


def _hosts(results: ProbeResults) -> list[str]:
    by_rank = {i.rank: i for i in results.identities}
    return [f"{by_rank[node[0]].hostname} ({by_rank[node[0]].address})" for node in results.nodes]


def _fraction(value: float) -> float:
    """A measured fraction of a datasheet peak, capped at 1 (boost clocks can exceed the datasheet)."""
    return min(1.0, float(f"{value:.4g}"))


def _device_spec(results: ProbeResults, catalog_gpu: GpuSpec | None, gemm: AlphaBeta) -> GpuSpec:
    device = results.device
    sustained_tflops = gemm.bandwidth_gbps / 1e3  # x is FLOPs, so 1/beta is GFLOP/s
    how = (
        f"moeplan probe {results.date}: {device.dtype} GEMMs of {len(device.gemm)} shapes fitted as t0 + F/R "
        f"(R = {sustained_tflops:.4g} TFLOP/s, t0 = {gemm.latency_us:.3g} us, rms {gemm.rms_relative_error:.1%}); "
        f"causal scaled_dot_product_attention {device.attention_shape} at {device.attention_fwd_tflops:.4g} / "
        f"{device.attention_bwd_tflops:.4g} TFLOP/s forward / backward; copy {device.memory_copy_gbps:.4g} GB/s"
    )
    if catalog_gpu is None:
        if device.kind == "cuda":
            raise SpecError(
                f"GPU '{device.name}' is not in the hardware catalog, so the probe has no datasheet peak to "
                "measure its efficiency against; pass --gpu NAME (see `moeplan show gpu`)"
            )
        peak = sustained_tflops
        return GpuSpec(
            name=f"cpu: {device.name}",
            peak_tflops=PeakTflops(bf16=float(f"{peak:.6g}")),
            hbm_gib=round(device.memory_gib, 3),
            hbm_gbps=float(f"{device.memory_copy_gbps:.6g}"),
            efficiency=ComputeEfficiency(
                gemm_fraction_bf16=1.0,
                gemm_overhead_us=round(gemm.latency_us, 3),
                attention_fwd_fraction=_fraction(device.attention_fwd_tflops / peak),
                attention_bwd_fraction=_fraction(device.attention_bwd_tflops / peak),
                hbm_fraction=1.0,
                source=how,
            ),
            source=(
                f"A CPU rank ({device.threads} thread(s)), measured by moeplan probe {results.date}. It has no "
                "tensor-core datasheet: the half-precision 'peak' is the sustained float32 GEMM rate the "
                "bundled runtime computes at on CPU, memory is the host's divided among the node's ranks and "
                "its bandwidth the measured copy rate."
            ),
        )
    half = catalog_gpu.peak_tflops.bf16 or catalog_gpu.peak_tflops.fp16
    assert half is not None
    fp8 = catalog_gpu.efficiency.gemm_fraction_fp8 if catalog_gpu.efficiency else None
    efficiency = ComputeEfficiency(
        gemm_fraction_bf16=_fraction(sustained_tflops / half),
        gemm_fraction_fp8=fp8,
        gemm_overhead_us=round(gemm.latency_us, 3),
        attention_fwd_fraction=_fraction(device.attention_fwd_tflops / half),
        attention_bwd_fraction=_fraction(device.attention_bwd_tflops / half),
        hbm_fraction=_fraction(device.memory_copy_gbps / catalog_gpu.hbm_gbps),
        source=how + ("; FP8 fraction from the hardware catalog (not measured)" if fp8 else ""),
    )
    return catalog_gpu.model_copy(update={"efficiency": efficiency})


def _topology(results: ProbeResults, profile_links: dict[str, LinkClass]) -> dict[str, Any]:
    graph = nx.Graph(name="probed")
    by_rank = {i.rank: i for i in results.identities}
    if len(results.nodes) > 1:
        graph.add_node("fabric", kind="fabric")
    intra = profile_links["intra_node"].collectives["all_gather"].bandwidth_gbps
    inter = (
        profile_links["inter_node"].collectives["all_gather"].bandwidth_gbps
        if "inter_node" in profile_links
        else 0
    )
    for index, node in enumerate(results.nodes):
        leader = by_rank[node[0]]
        switch = f"n{index}"
        graph.add_node(
            switch, kind="scale_up_switch", node=index, hostname=leader.hostname, address=leader.address
        )
        topo = results.nvidia_smi_topo.get(index)
        if topo:
            matrix = parse_topo_matrix(topo)
            # A probe may use fewer GPUs than the node has: then ranks are attached below, by local index.
            add_node_to_graph(graph, matrix, index, list(node) if len(matrix.gpus) == len(node) else None)
            for gpu, numa in matrix.numa_affinity.items():
                graph.nodes[f"n{index}/gpu{gpu.removeprefix('GPU')}"]["numa_node"] = numa
        for local, rank in enumerate(node):
            vertex = f"n{index}/gpu{local}"
            if vertex not in graph:
                graph.add_node(vertex, kind="gpu", node=index, local_rank=local, rank=rank)
            graph.nodes[vertex].update(device=by_rank[rank].device, device_name=by_rank[rank].device_name)
            graph.add_edge(vertex, switch, link_class="intra_node", bandwidth_gbps=intra, measured=True)
            if inter:
                graph.add_edge(vertex, "fabric", link_class="inter_node", bandwidth_gbps=inter, measured=True)
    data: dict[str, Any] = nx.node_link_data(graph, edges="edges")
    return data


def _nic_affinity(results: ProbeResults) -> tuple[NicAffinity, ...]:
    topo = results.nvidia_smi_topo.get(0)
    return nic_affinity(parse_topo_matrix(topo)) if topo else ()


def _host(results: ProbeResults, per_node: int) -> HostSpec | None:
    """The node's host figures for optimizer offload, where there is a device to offload from (GPUs)."""
    device = results.device
    if (
        device.host_device_copy_gbps is None
        or device.host_memory_gib is None
        or not device.host_memory_copy_gbps
    ):
        return None
    return HostSpec(
        memory_gib=round(device.host_memory_gib, 1),
        device_copy_gbps=round(device.host_device_copy_gbps, 2),
        memory_gbps=round(device.host_memory_copy_gbps * per_node, 1),
        source=f"probe: sysconf, pinned 256 MiB copies and a 256 MiB host copy on each of {per_node} ranks at once",
    )


def build_profile(
    results: ProbeResults, name: str, catalog_gpu: GpuSpec | None = None, description: str | None = None
) -> ClusterProfile:
    """The cluster profile a probe's record describes: SpecError when the record cannot describe one,
    ExecutionError when a series the profile needs gives no fit."""
    per_node = len(results.nodes[0])
    if per_node < 2:
        raise SpecError(
            f"the probe ran {per_node} rank per node, so it could not measure the intra_node link; "
            "a cluster profile needs at least 2 ranks on each node"
        )
    scopes: list[Scope] = ["intra_node", "inter_node"] if len(results.nodes) > 1 else ["intra_node"]
    for scope in scopes:
        _check_sizes(results, scope)
    fitted = {scope: link_fits(results, scope) for scope in scopes}
    gemm = _needed_fits(results, fitted, _gemm_fit(results))
    links: dict[str, LinkClass] = {scope: _link_class(results, scope, fitted[scope].fits) for scope in scopes}
    warnings = _warnings(fitted, gemm, results.device.dtype)
    return ClusterProfile(
        name=name,
        description=description
        or f"probed: {len(results.nodes)} node(s) x {per_node} {results.device.kind} ranks, {results.backend}",
        num_nodes=len(results.nodes),
        num_gpus_per_node=per_node,
        gpu=_device_spec(results, catalog_gpu, gemm),
        links=links,
        nic_affinity=_nic_affinity(results),
        topology=_topology(results, links),
        host_overhead_us=round(results.device.host_overhead_us, 3),
        host=_host(results, per_node),
        provenance=Provenance(
            kind="probe",
            source=results.command,
            date=results.date,
            hosts=tuple(_hosts(results)),
            library_versions=results.library_versions,
            warnings=warnings or None,
        ),
    )


def probe_summary(results: ProbeResults, profile: ClusterProfile) -> dict[str, Any]:
    """What ``moeplan probe --json`` prints: nodes, ranks, and each link class's fitted figures."""
    per_node = profile.num_gpus_per_node
    links = []
    for scope, link in profile.links.items():
        fits = link_fits(results, scope).fits  # type: ignore[arg-type]
        # The link's figures are what the best collective gets out of it: the highest bus bandwidth (the
        # capacity, as nccl-tests users quote all_reduce busbw) and the lowest latency. Collectives that
        # implement worse (gloo's reduce_scatter is a whole all-reduce) keep their own fits in the
        # profile, which is what the cost model reads.
        bandwidth = max(link.collectives[k].bandwidth_gbps for k in COLLECTIVE_KINDS)
        entry: dict[str, Any] = {
            "class": scope,
            "bandwidth_gbps": bandwidth,
            "bandwidth_from": max(COLLECTIVE_KINDS, key=lambda k: link.collectives[k].bandwidth_gbps),
            "latency_us": min(link.collectives[k].latency_us for k in COLLECTIVE_KINDS),
            "collectives": {
                kind: {
                    "bandwidth_gbps": fit.bandwidth_gbps,
                    "latency_us": fit.latency_us,
                    "rms_relative_error": fit.rms_relative_error,
                    "poor_fit": fit.poor,
                    "points": fit.points,
                }
                for kind, fit in fits.items()
            },
        }
        if scope == "inter_node":
            entry["node_bandwidth_gbps"] = bandwidth * per_node
        links.append(entry)
    return {
        "name": profile.name,
        "nodes": profile.num_nodes,
        "ranks": results.world_size,
        "ranks_per_node": per_node,
        "backend": results.backend,
        "hosts": list(profile.provenance.hosts),
        "links": links,
        "device": {
            "name": profile.gpu.name,
            "gemm_tflops": (profile.gpu.peak_tflops.bf16 or 0)
            * (profile.gpu.efficiency.gemm_fraction_bf16 if profile.gpu.efficiency else 1),
            "host_overhead_us": profile.host_overhead_us,
        },
        "budget_s": results.budget_s,
        "elapsed_s": results.elapsed_s,
        "warnings": list(profile.provenance.warnings or ()),
    }


def nccl_tests_table(results: ProbeResults) -> str:
    """Every timed point in nccl-tests' output layout, one block per scope and collective."""
    lines = []
    for scope in ("intra_node", "inter_node", "world"):
        for kind in sorted({m.kind for m in results.measurements if m.scope == scope}):
            points = _series(results, scope, kind)
            first = points[0]
            lines.append(f"# {kind} on {scope}: {first.groups} group(s) of {first.group_size} ranks")
            lines.append(
                f"#{'size':>12}{'count':>12}{'type':>8}{'redop':>7}{'root':>6}{'time':>10}{'algbw':>9}{'busbw':>9}"
            )
            lines.append(
                f"#{'(B)':>12}{'(elements)':>12}{'':>8}{'':>7}{'':>6}{'(us)':>10}{'(GB/s)':>9}{'(GB/s)':>9}"
            )
            redop = "sum" if kind in ("all_reduce", "reduce_scatter") else "none"
            for p in points:
                lines.append(
                    f" {p.size_bytes:>12}{p.size_bytes // 4:>12}{'float':>8}{redop:>7}{-1:>6}"
                    f"{p.seconds * 1e6:>10.1f}{p.algbw_gbps:>9.3f}{p.busbw_gbps:>9.3f}"
                )
            avg = statistics.mean(p.busbw_gbps for p in points)
            lines.append(f"# Avg bus bandwidth    : {avg:.4g}")
            lines.append("")
    return "\n".join(lines)
