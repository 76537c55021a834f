"""What a probe run measured, before any fitting: the record rank 0 hands to whoever writes the profile.

Kept separate from the cluster profile on purpose: the profile holds fitted figures with their sources;
this record holds every timed point, so a profile can be rebuilt (or re-fitted differently) from it and
the nccl-tests-style table can be printed from it. It is plain JSON (pydantic), torch-free.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt

from planner.probe.bandwidth import BenchKind
from planner.schema._base import Spec

__all__ = [
    "DeviceMeasurements",
    "GemmPoint",
    "Measurement",
    "ProbeResults",
    "RankIdentity",
    "Scope",
    "group_into_nodes",
]

Scope = Literal["intra_node", "inter_node", "world"]
"""Which groups a measurement ran on: the ranks of each node, the same-local-rank peers across nodes
(all such groups at once, as nccl-tests' ``NCCL_TESTS_SPLIT="MOD <ranks per node>"``), or every rank."""


class RankIdentity(Spec):
    """One rank as it announced itself at rendezvous."""

    rank: int = Field(ge=0)
    hostname: str
    address: str
    """The local address this rank uses to reach the rendezvous host (``MASTER_ADDR``)."""
    device: str
    """``cpu`` or ``cuda:<index>``."""
    device_name: str
    """CPU model or GPU name (``torch.cuda.get_device_name``)."""

    @property
    def host_key(self) -> str:
        """What makes two ranks share a node: the host *and* the address it is reached at (two network
        namespaces on one host are two nodes; two ranks of one host are one node whatever their numbers)."""
        return f"{self.hostname} {self.address}"


class Measurement(Spec):
    """One collective at one size on one scope: the mean time per operation, slowest rank."""

    scope: Scope
    kind: BenchKind
    group_size: int = Field(ge=2)
    """Ranks per group."""
    groups: PositiveInt
    """Groups that ran the collective at the same time."""
    size_bytes: PositiveInt
    """nccl-tests' S for this collective (``planner/probe/bandwidth.py``)."""
    seconds: PositiveFloat
    """Mean seconds per operation over ``iterations`` back-to-back runs; the maximum over all ranks."""
    iterations: PositiveInt
    algbw_gbps: PositiveFloat
    busbw_gbps: PositiveFloat


class GemmPoint(Spec):
    """One timed matrix multiply ``(m x k) @ (k x n)``."""

    m: PositiveInt
    n: PositiveInt
    k: PositiveInt
    seconds: PositiveFloat
    """Mean seconds per GEMM."""

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k


class DeviceMeasurements(Spec):
    """Compute figures of one rank's device, measured while every rank of its node ran the same."""

    kind: Literal["cpu", "cuda"]
    name: str
    dtype: str
    """Element type of the GEMM and attention measurements (``float32`` on CPU, ``bfloat16`` on GPUs)."""
    threads: PositiveInt | None = None
    """Intra-op threads per rank on CPU (cores / ranks per node)."""
    gemm: tuple[GemmPoint, ...]
    attention_fwd_tflops: PositiveFloat
    """Causal fused attention (``scaled_dot_product_attention``) forward TFLOP/s."""
    attention_bwd_tflops: PositiveFloat
    """Its backward TFLOP/s (2.5x the forward FLOPs, FlashAttention-2's count)."""
    memory_copy_gbps: PositiveFloat
    """Device-memory copy bandwidth, GB/s, counting read and write bytes (STREAM copy convention)."""
    memory_gib: PositiveFloat
    """Device memory per rank: the GPU's, or the host's divided among the node's ranks on CPU."""
    host_overhead_us: float = Field(ge=0)
    """Host time to launch one tiny eager-mode operation."""
    host_memory_gib: PositiveFloat | None = None
    """The node's physical memory (``sysconf``), GiB."""
    host_memory_copy_gbps: PositiveFloat | None = None
    """Host-memory copy bandwidth of this rank while every rank of the node copies, each with its share of
    the cores (what the host's Adam gets under optimizer offload), GB/s, read plus write bytes."""
    host_device_copy_gbps: PositiveFloat | None = None
    """Pinned host-to-device and device-to-host copy bandwidth of this rank while every rank of the node
    copies, the slower direction, GB/s (GPUs only)."""
    attention_shape: str
    """batch x heads x sequence x head dim of the attention measurement."""


class ProbeResults(Spec):
    """Everything one probe run measured, and how it ran."""

    command: str
    date: str
    backend: Literal["gloo", "nccl"]
    world_size: PositiveInt
    budget_s: PositiveFloat
    elapsed_s: float = Field(ge=0)
    """Seconds from launch to the end of the measurements."""
    identities: tuple[RankIdentity, ...]
    nodes: tuple[tuple[int, ...], ...]
    """Global ranks of each node, nodes ordered by their lowest rank."""
    measurements: tuple[Measurement, ...]
    device: DeviceMeasurements
    nvidia_smi_topo: dict[int, str] = Field(default_factory=dict)
    """``nvidia-smi topo -m`` output per node index, where GPUs and nvidia-smi exist."""
    library_versions: dict[str, str] = Field(default_factory=dict)
    interface: str | None = None
    """The network interface gloo was bound to (``GLOO_SOCKET_IFNAME``), if any."""


def group_into_nodes(identities: list[RankIdentity]) -> tuple[tuple[int, ...], ...]:
    """Ranks grouped by node (host and address), nodes ordered by their lowest rank.

    Raises ValueError when nodes hold different numbers of ranks: a cluster profile describes
    identical nodes."""
    by_host: dict[str, list[int]] = {}
    for identity in sorted(identities, key=lambda i: i.rank):
        by_host.setdefault(identity.host_key, []).append(identity.rank)
    nodes = sorted((tuple(ranks) for ranks in by_host.values()), key=lambda ranks: ranks[0])
    sizes = {len(node) for node in nodes}
    if len(sizes) > 1:
        counts = ", ".join(f"{key}: {len(ranks)}" for key, ranks in by_host.items())
        raise ValueError(
            f"nodes hold different numbers of ranks ({counts}); a cluster profile describes identical "
            "nodes, so probe an allocation with the same number of ranks on every node"
        )
    return tuple(nodes)
