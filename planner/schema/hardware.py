"""GPU and cluster specs: datasheet peaks, link classes with alpha-beta fits, topology, provenance.

Bandwidths follow nccl-tests' conventions (``../shared/reference/ecosystem.md`` §4.1): GB/s = 1e9 B/s
and *bus bandwidth* (busbw), so one figure describes all collective kinds on a link:
``t(n_bytes) = latency + algbw_bytes / (busbw / factor)``, with factor ``2(p-1)/p`` for all_reduce,
``(p-1)/p`` for all_gather, reduce_scatter and all_to_all, and 1 for send/recv.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveInt, model_validator

from planner.schema._base import Spec
from planner.schema.ranges import (
    MAX_WORLD_SIZE,
    Bandwidth,
    GpusPerNode,
    HostMicroseconds,
    Latency,
    Memory,
    NodeCount,
    Seconds,
    Tflops,
)

__all__ = [
    "COLLECTIVE_KINDS",
    "AlphaBetaFit",
    "ClusterProfile",
    "CollectiveKind",
    "ComputeEfficiency",
    "GpuSpec",
    "HostSpec",
    "LinkClass",
    "LinkClassName",
    "NicAffinity",
    "PeakTflops",
    "Provenance",
]

CollectiveKind = Literal["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv"]
COLLECTIVE_KINDS: tuple[CollectiveKind, ...] = (
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "all_to_all",
    "send_recv",
)
LinkClassName = Literal["intra_node", "inter_node", "pcie"]


class PeakTflops(Spec):
    """Dense (no sparsity) tensor-core peaks in TFLOP/s, per dtype; null where the GPU lacks the dtype."""

    bf16: Tflops | None = None
    """BF16 dense peak, TFLOP/s (null on V100, which has no BF16 tensor cores)."""
    fp16: Tflops | None = None
    """FP16 dense peak, TFLOP/s; used where BF16 is missing."""
    fp8: Tflops | None = None
    """FP8 dense peak, TFLOP/s (Hopper and later); also used for MXFP8."""

    @model_validator(mode="after")
    def _needs_a_half_precision_peak(self) -> PeakTflops:
        if self.bf16 is None and self.fp16 is None:
            raise ValueError("peak_tflops needs a bf16 or an fp16 figure")
        return self


class ComputeEfficiency(Spec):
    """Achieved fractions of the datasheet peaks, from microbenchmarks (a probe can measure them).

    A GEMM of F FLOPs takes ``gemm_overhead_us + F / (fraction * peak)``: a fixed per-kernel cost
    (launch, tile ramp-up, wave quantisation) plus a sustained fraction of the peak, the same
    latency-bandwidth form as a link's alpha-beta fit (``benchmarks/fit_gemm_efficiency.py``). Where the
    measured fraction keeps growing with the GEMM's size well past where a fixed cost matters (the A100:
    0.73 of its peak at 4096^3, 0.81 at 8192^3), ``gemm_curve_bf16`` holds the measured points instead.
    """

    gemm_fraction_bf16: float = Field(gt=0, le=1)
    """Large BF16/FP16 GEMM TFLOP/s over the dense BF16 peak."""
    gemm_curve_bf16: tuple[tuple[float, float], ...] | None = None
    """Measured (FLOPs of one GEMM, fraction of the BF16 peak) points, in increasing FLOPs; when given, a
    16-bit GEMM's fraction is interpolated between them in log FLOPs (the end points' fractions beyond
    them) and no ``gemm_overhead_us`` is added: the measured times include it. Null: the flat figure."""
    gemm_fraction_fp8: float | None = Field(default=None, gt=0, le=1)
    """Large FP8 GEMM TFLOP/s over the dense FP8 peak; null without FP8."""
    gemm_overhead_us: float = Field(ge=0)
    """Fixed time per GEMM kernel, microseconds."""
    attention_fwd_fraction: float = Field(gt=0, le=1)
    """Fused causal attention forward TFLOP/s over the BF16 peak (sequence 4096, head dim 128)."""
    attention_bwd_fraction: float = Field(gt=0, le=1)
    """Fused attention backward TFLOP/s over the BF16 peak."""
    hbm_fraction: float = Field(gt=0, le=1)
    """Achieved (STREAM-like) memory bandwidth over the datasheet figure."""
    source: str
    """The microbenchmarks behind each fraction."""

    @model_validator(mode="after")
    def _curve_is_measured_points(self) -> ComputeEfficiency:
        curve = self.gemm_curve_bf16
        if curve is None:
            return self
        if len(curve) < 2:
            raise ValueError("gemm_curve_bf16 needs at least two (FLOPs, fraction) points, or null")
        for flops, fraction in curve:
            if not (flops > 0 and flops < float("inf")) or not 0 < fraction <= 1:
                raise ValueError(
                    f"gemm_curve_bf16 point ({flops:g}, {fraction:g}): FLOPs must be finite and above 0, "
                    "the fraction above 0 and at most 1"
                )
        if any(b[0] <= a[0] for a, b in zip(curve, curve[1:], strict=False)):
            raise ValueError("gemm_curve_bf16 points must be in strictly increasing FLOPs")
        return self


class FrameworkOverheads(Spec):
    """What the training software costs beyond the kernels' own time, per cluster.

    Microbenchmarks measure kernels alone; a framework in eager mode adds host time per kernel it
    launches (Python, module bookkeeping, allocation, synchronisation), and sustained training runs its
    GEMMs and attention slower than a short benchmark does (clocks under sustained power, shapes and
    layouts of real layers, interference from concurrent kernels).
    """

    kernel_host_us: HostMicroseconds
    """Framework host time per launched kernel, microseconds, on top of the profile's
    ``host_overhead_us`` (the bare launch a probe measures)."""
    sustained_compute_fraction: float = Field(gt=0, le=1)
    """Fraction of the microbenchmarked GEMM and attention throughput that training sustains."""
    source: str
    """The fit or measurement behind both figures."""


class GpuSpec(Spec):
    """One GPU model's datasheet figures. A ``gpus`` entry of the validation format loads unchanged."""

    name: str | None = None
    """GPU name as in the hardware catalog (e.g. ``H100-SXM``); taken from the mapping key when absent."""
    peak_tflops: PeakTflops
    """Dense tensor-core peaks per dtype, TFLOP/s."""
    hbm_gib: Memory
    """Device memory capacity, GiB."""
    hbm_gbps: Bandwidth
    """Device memory bandwidth, GB/s."""
    num_sms: PositiveInt | None = None
    """Streaming multiprocessors (communication kernels such as DeepEP occupy some of them)."""
    scale_up_gbps: Bandwidth | None = None
    """Nominal scale-up (NVLink, or PCIe when there is none) bandwidth per GPU per direction, GB/s."""
    efficiency: ComputeEfficiency | None = None
    """Achieved fractions of the peaks; null means the cost model's defaults for the GPU's generation."""
    compute_capability: str | None = Field(default=None, pattern=r"^\d+\.\d+$")
    """CUDA compute capability, ``major.minor`` (NVIDIA's CUDA GPUs list), e.g. ``9.0`` for Hopper. It
    decides the precisions and kernels a plan may use (``planner.feasibility``); null when unknown (a CPU
    rank, or a file that leaves it out), and then those rules are not checked."""
    nvlink: bool | None = None
    """Whether the GPUs of a node talk over NVLink (DeepEP and Hybrid-EP need it); null when unknown."""
    source: str
    """Datasheet or publication for every figure above."""

    @property
    def capability(self) -> tuple[int, int] | None:
        """``compute_capability`` as (major, minor), comparable with tuples such as (8, 9)."""
        if self.compute_capability is None:
            return None
        major, minor = self.compute_capability.split(".")
        return int(major), int(minor)


class AlphaBetaFit(Spec):
    """Hockney (alpha-beta) model of one collective on one link class: ``t = latency + bytes / bandwidth``."""

    latency_us: Latency
    """Per-operation latency alpha, microseconds (the small-message time)."""
    bandwidth_gbps: Bandwidth
    """Large-message bus bandwidth per GPU (nccl-tests busbw), GB/s."""
    source: str
    """Measurement (publication, or probe run) or the rule that derived this figure from one."""
    rms_relative_error: float | None = Field(default=None, ge=0)
    """Root-mean-square relative residual of the fit over the sizes timed (probe profiles only; a probe
    lists a fit above its threshold, ``planner/probe/fit.py``'s ``POOR_FIT_RMS``, in
    ``provenance.warnings``)."""


class LinkClass(Spec):
    """A class of links that the same traffic pattern crosses (NVLink in a node, the NIC between nodes)."""

    medium: str
    """What the link is, e.g. ``NVLink4 + NVSwitch`` or ``InfiniBand NDR 400 Gb/s, one NIC per GPU``."""
    nominal_gbps: Bandwidth
    """Line rate per GPU per direction, GB/s (before protocol overhead)."""
    collectives: dict[CollectiveKind, AlphaBetaFit]
    """Fitted alpha-beta per collective kind. Rule: all five kinds are present."""
    source: str
    """Where the nominal figure and the fits come from."""

    @model_validator(mode="after")
    def _all_kinds_present(self) -> LinkClass:
        missing = [kind for kind in COLLECTIVE_KINDS if kind not in self.collectives]
        if missing:
            raise ValueError(
                f"collectives must cover {', '.join(COLLECTIVE_KINDS)}; missing {', '.join(missing)}"
            )
        return self


class NicAffinity(Spec):
    """Which NIC a GPU uses and how close it is (``nvidia-smi topo -m`` notation)."""

    gpu: int = Field(ge=0)
    """Local GPU index within the node."""
    nic: str
    """NIC name (e.g. ``mlx5_0`` or ``NIC0``)."""
    path: Literal["PIX", "PXB", "PHB", "NODE", "SYS"]
    """PCIe path between them: PIX (one switch) < PXB < PHB (host bridge) < NODE < SYS (across sockets)."""


class Provenance(Spec):
    """Where a cluster profile comes from: a publication, a probe run, or the user."""

    kind: Literal["published", "probe", "user"]
    """``published`` (datasheets and published measurements), ``probe`` (``moeplan probe``), or ``user``."""
    source: str
    """Citations, or the probe command that produced the profile."""
    date: str | None = None
    """ISO date of the probe run or of the publication check."""
    hosts: tuple[str, ...] = ()
    """Host names the probe ran on."""
    library_versions: dict[str, str] = Field(default_factory=dict)
    """Versions of torch, NCCL, gloo, driver, ... used by the probe."""
    warnings: tuple[str, ...] | None = None
    """What the probe could not fit, or fitted poorly: one line per series it skipped (and why) and per fit
    above its rms threshold, as it printed them. None when it had nothing to say, and for other profiles."""


class HostSpec(Spec):
    """The host (CPU) side of a node: what optimizer CPU offload needs."""

    memory_gib: Memory
    """Host memory (DRAM) per node, GiB."""
    device_copy_gbps: Bandwidth
    """Pinned host-to-device and device-to-host copy bandwidth per GPU per direction while every GPU of the
    node copies at once, GB/s (PCIe or NVLink-C2C)."""
    memory_gbps: Bandwidth
    """Host memory bandwidth per node that a streaming kernel reaches (a STREAM-like figure), GB/s: the
    host's Adam step is bound by it."""
    source: str
    """Where the figures come from."""


class ClusterProfile(Spec):
    """A cluster: identical nodes of GPUs, the link classes between them, and where the figures come from."""

    name: str
    """Profile name (e.g. ``a800-2x8``)."""
    description: str | None = None
    """One line for ``moeplan clusters``."""
    num_nodes: NodeCount
    """Nodes (scale-up domains). ``--nodes`` overrides it for a bundled profile."""
    num_gpus_per_node: GpusPerNode
    """GPUs that share the fast scale-up domain (NVLink/NVSwitch, or a PCIe tree)."""
    gpu: GpuSpec
    """The GPU every rank has."""
    links: dict[LinkClassName, LinkClass]
    """Link classes by name. Rule: ``intra_node`` always; ``inter_node`` whenever nodes can be more than one."""
    nic_affinity: tuple[NicAffinity, ...] = ()
    """GPU-to-NIC placement within a node; empty when unknown."""
    topology: dict[str, Any] | None = None
    """The probed topology as networkx node-link data; null for a regular cluster (built on demand)."""
    host_overhead_us: HostMicroseconds = 5.0
    """Host (CPU) time per kernel a framework launches in eager mode, microseconds: Python, PyTorch's
    dispatcher and cudaLaunchKernel. Default 5: the low end of the 5-25 us per op of PyTorch's dispatch
    chain (jiahuanglin.xyz GPU-serving lesson 18), and Megatron's GB200 guide: "a simple torch.empty ...
    will generate a few microseconds of overhead on the host side". A probe measures it."""
    framework: FrameworkOverheads | None = None
    """The training software's overheads; null means the cost model's Megatron-Core figures
    (``planner.costmodel.compute.MEGATRON_CORE_EAGER``, fitted to published runs)."""
    host: HostSpec | None = None
    """Host memory and host-device bandwidth; null when unknown, and then no plan offloads the optimizer."""
    step_overhead_s: Seconds = 0.0
    """Host time per optimizer step outside every priced kernel and collective, seconds: the framework's
    Python, optimizer launch and bookkeeping between steps. Default 0 (not modelled); ``moeplan
    calibrate`` fits it to measured runs, where it is the step time no layout change removes."""
    provenance: Provenance
    """Publication or probe run behind the figures."""

    @model_validator(mode="after")
    def _links_present(self) -> ClusterProfile:
        if self.num_nodes * self.num_gpus_per_node > MAX_WORLD_SIZE:
            raise ValueError(
                f"num_nodes x num_gpus_per_node ({self.num_nodes} x {self.num_gpus_per_node}) must be at most "
                f"{MAX_WORLD_SIZE:,} GPUs"
            )
        if "intra_node" not in self.links:
            raise ValueError("links must include intra_node")
        if "inter_node" not in self.links and self.num_nodes > 1:
            raise ValueError(f"num_nodes is {self.num_nodes}, so links must include inter_node")
        if self.topology is not None and not all(
            isinstance(self.topology.get(k), list) for k in ("nodes", "edges")
        ):
            raise ValueError("topology must be networkx node-link data with 'nodes' and 'edges' lists")
        for affinity in self.nic_affinity:
            if affinity.gpu >= self.num_gpus_per_node:
                raise ValueError(
                    f"nic_affinity gpu {affinity.gpu} is not below num_gpus_per_node ({self.num_gpus_per_node})"
                )
        return self

    @property
    def world_size(self) -> int:
        """Total GPUs."""
        return self.num_nodes * self.num_gpus_per_node
