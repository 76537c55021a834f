"""The optimizer step: Adam on the GPU over its share of the state and, with CPU offload, the host's share.

GPU Adam is bound by HBM traffic. Per parameter it reads the gradient (g bytes) and the state (s bytes:
master and moments), writes the state, writes the BF16 weight (2) and zeroes the gradient buffer (g):
``2g + 2s + 2`` bytes; Megatron-LM's defaults (g = 4, s = 12) give 34.

Offloaded (``--optimizer-cpu-offload``; Megatron-LM d98e8a6 ``cpu_offloading/hybrid_optimizer.py``), each
host parameter costs per step:

- its gradient copied to the host and its updated value copied back, 4 bytes each way: the host keeps
  FP32 parameters and gradients (``param_update_in_fp32``), and a non-blocking copy converts on the GPU,
  so FP32 crosses the link whatever the gradient buffer's dtype (PyTorch ``aten/src/ATen/native/cuda/
  Copy.cu``), at the profile's pinned copy bandwidth per GPU (``HostSpec.device_copy_gbps``);
- the host's ``torch.optim.AdamW`` (``fused=True``), bound by host memory traffic: it reads the FP32
  parameter, gradient, m and v and writes the parameter, m and v, 28 bytes, at the node's memory bandwidth
  (``HostSpec.memory_gbps``) shared by its GPUs' processes. That needs threads: torchrun starts each
  process with ``OMP_NUM_THREADS=1``, and one thread reaches about 0.28 G parameters/s
  (ISEEKYAN/Megatron-LM#188), so the emitted launch gives each process its share of the host's cores.

The copies and the host Adam add up, unless ``--overlap-cpu-optimizer-d2h-h2d`` overlaps them (the larger
one then counts). The GPU's share runs before the host's (``HybridDeviceOptimizer.step``): the two add.
Every term is linear in the state bytes a rank holds, so the solver's ILP keeps one row per rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.costmodel import compute
from planner.costmodel.memory import FP32_STATE_BYTES, HOST_STATE_BYTES, optimizer_bytes_per_param
from planner.errors import SpecError
from planner.schema import ClusterProfile, OptimizerConfig

__all__ = [
    "HOST_ADAM_BYTES_PER_PARAM",
    "HOST_RESERVE_FRACTION",
    "OptimizerRates",
    "host_capacity_per_gpu",
    "optimizer_rates",
]

HOST_ADAM_BYTES_PER_PARAM = 28.0
"""Host memory traffic of one FP32 AdamW update: read parameter, gradient, m, v; write parameter, m, v."""
HOST_COPY_BYTES = 8.0
"""Bytes copied per offloaded parameter and step: the FP32 gradient to the host, the FP32 value back."""


HOST_RESERVE_FRACTION = 0.1
"""Share of a node's host memory kept for the operating system, page cache, data-loader workers and
the framework's own pinned buffers: an assumption (no published figure), as the GPU's reserve."""


def host_capacity_per_gpu(cluster: ClusterProfile) -> float:
    """Host bytes one GPU's process may fill with offloaded optimizer state: its even share of the node's
    memory less ``HOST_RESERVE_FRACTION`` (0 when the profile states no host)."""
    if cluster.host is None:
        return 0.0
    return cluster.host.memory_gib * 2**30 * (1.0 - HOST_RESERVE_FRACTION) / cluster.num_gpus_per_node


@dataclass(frozen=True, slots=True)
class OptimizerRates:
    """Seconds of the optimizer step per byte of optimizer state, on the GPU and on the host."""

    per_gpu_byte: float
    per_host_byte: float

    def seconds(self, gpu_bytes: float, host_bytes: float) -> float:
        return self.per_gpu_byte * gpu_bytes + self.per_host_byte * host_bytes


def optimizer_rates(optimizer: OptimizerConfig, precision: str, cluster: ClusterProfile) -> OptimizerRates:
    """The step's seconds per byte of GPU and host optimizer state for this configuration (module docstring)."""
    gradient = optimizer.gradient_bytes
    gpu_state, host_state = optimizer_bytes_per_param(optimizer, precision)
    per_gpu_byte = 0.0
    if gpu_state > 0:
        # With offload the GPU share's state is its FP32 copy and moments: 12 bytes a parameter.
        state = FP32_STATE_BYTES if optimizer.offloads else gpu_state
        traffic = 2 * gradient + 2 * state + 2.0
        per_gpu_byte = compute.memory_time(traffic / state, cluster.gpu)
    per_host_byte = 0.0
    if host_state > 0:
        host = cluster.host
        if host is None:
            raise SpecError(
                f"optimizer.offload_fraction ({optimizer.offload_fraction:g}) needs the host's memory and copy "
                f"bandwidth, and cluster '{cluster.name}' states neither: give its profile a host: block "
                "(memory_gib, device_copy_gbps, memory_gbps, source), or offload nothing."
            )
        copy_s = HOST_COPY_BYTES / (host.device_copy_gbps * 1e9)
        adam_s = HOST_ADAM_BYTES_PER_PARAM / (host.memory_gbps * 1e9 / cluster.num_gpus_per_node)
        per_param = max(copy_s, adam_s) if optimizer.overlap_offload else copy_s + adam_s
        per_host_byte = per_param / HOST_STATE_BYTES
    return OptimizerRates(per_gpu_byte, per_host_byte)
