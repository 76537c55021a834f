"""Compute microbenchmarks of one rank's device: GEMMs against shape, fused attention, memory copy, and
the host's launch overhead per eager operation.

What the cost model needs (``planner/costmodel/compute.py``): a GEMM of F FLOPs takes
``t0 + F / (fraction x peak)`` (fitted over the shapes here by ``planner/probe/fit.py``); attention runs
at a fraction of the half-precision peak (forward FLOPs ``2 b s^2 a d`` for causal attention, half of the
``4 b s^2 a d`` of a full one; backward 2.5x that, FlashAttention-2 §3.2); HBM moves bytes at a fraction
of its datasheet rate; and the host spends ``host_overhead_us`` per kernel it launches. For optimizer
CPU offload (``planner/costmodel/optimizer.py``): the node's memory, the host-memory copy bandwidth a rank
gets with its share of the cores, and on GPUs the pinned copy bandwidth to and from the device, every
rank copying at once.

On GPUs: bfloat16, timed with a device synchronise around back-to-back runs. On CPUs: float32 (what the
bundled runtime computes in on CPU ranks), with the node's cores shared among its ranks
(``torch.set_num_threads``, as torchrun's ``OMP_NUM_THREADS`` does), every rank measuring at once so
that each figure is what one rank gets while its neighbours work.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from planner.probe.results import DeviceMeasurements, GemmPoint

__all__ = ["device_name", "measure_device"]

CPU_GEMM_SHAPES = ((128, 128, 128), (256, 256, 256), (512, 512, 512), (1024, 1024, 1024), (2048, 512, 1024))
GPU_GEMM_SHAPES = (
    (512, 512, 512),
    (1024, 1024, 1024),
    (2048, 2048, 2048),
    (4096, 4096, 4096),
    (8192, 8192, 8192),
    (4096, 14336, 4096),
    (16384, 4096, 1024),
)
CPU_ATTENTION = (1, 8, 512, 64)
GPU_ATTENTION = (2, 16, 4096, 128)
"""batch, heads, sequence, head dim: the schema's attention fractions are defined at sequence 4096,
head dim 128 on GPUs."""


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mean_seconds(fn: Callable[[], object], device: torch.device, seconds: float) -> float:
    """Mean time of ``fn`` over enough back-to-back calls to fill about ``seconds`` (after one warm-up)."""
    fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    single = max(time.perf_counter() - start, 1e-7)
    iterations = max(2, min(1000, int(seconds / single)))
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iterations


def _gemms(device: torch.device, dtype: torch.dtype, seconds: float) -> tuple[GemmPoint, ...]:
    shapes = GPU_GEMM_SHAPES if device.type == "cuda" else CPU_GEMM_SHAPES
    points = []
    for m, n, k in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        t = _mean_seconds(partial(torch.matmul, a, b), device, seconds)
        points.append(GemmPoint(m=m, n=n, k=k, seconds=t))
    return tuple(points)


def _attention(device: torch.device, dtype: torch.dtype, seconds: float) -> tuple[float, float, str]:
    """(forward TFLOP/s, backward TFLOP/s, shape) of causal scaled-dot-product attention."""
    b, h, s, d = GPU_ATTENTION if device.type == "cuda" else CPU_ATTENTION
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    forward_flops = 2.0 * b * s * s * h * d  # causal: half of 4 b s^2 h d

    def forward() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    out = forward()
    grad = torch.ones_like(out)

    def forward_backward() -> None:
        torch.autograd.backward(forward(), grad)

    with torch.no_grad():
        fwd = _mean_seconds(forward, device, seconds)
    both = _mean_seconds(forward_backward, device, seconds)
    bwd = max(both - fwd, 1e-9)
    return forward_flops / fwd / 1e12, 2.5 * forward_flops / bwd / 1e12, f"{b}x{h}x{s}x{d}"


def _memory_copy_gbps(device: torch.device, seconds: float, elements: int | None = None) -> float:
    """Copy bandwidth, read plus write bytes, of a buffer far larger than the caches."""
    if elements is None:
        elements = (256 if device.type == "cuda" else 16) * 2**20  # 1 GiB on GPUs, 64 MiB on CPUs (fp32)
    src = torch.ones(elements, device=device)
    dst = torch.empty_like(src)
    t = _mean_seconds(lambda: dst.copy_(src), device, seconds)
    return 2 * src.numel() * src.element_size() / t / 1e9


def _host_memory_copy_gbps(ranks_per_node: int, seconds: float) -> float:
    """Host-memory copy bandwidth (read plus write) of a 256 MiB buffer, with this rank's share of the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_per_node))
    try:
        return _memory_copy_gbps(torch.device("cpu"), seconds, elements=64 * 2**20)  # float32
    finally:
        torch.set_num_threads(threads)


def _host_device_copy_gbps(device: torch.device, seconds: float) -> float | None:
    """Pinned copies of 256 MiB to and from the GPU: the slower direction's bandwidth, GB/s (None on CPU)."""
    if device.type != "cuda":
        return None
    host = torch.empty(128 * 2**20, dtype=torch.bfloat16, pin_memory=True)
    on_device = torch.empty(host.numel(), dtype=host.dtype, device=device)
    to_device = _mean_seconds(lambda: on_device.copy_(host, non_blocking=True), device, seconds)
    to_host = _mean_seconds(lambda: host.copy_(on_device, non_blocking=True), device, seconds)
    return host.numel() * host.element_size() / max(to_device, to_host) / 1e9


def _host_overhead_us(device: torch.device) -> float:
    """Host microseconds per tiny eager operation (launch cost; on GPUs not waiting for the kernel)."""
    a = torch.ones(1, device=device)
    out = torch.empty_like(a)
    for _ in range(100):
        torch.add(a, a, out=out)
    _sync(device)
    count = 2000
    start = time.perf_counter()
    for _ in range(count):
        torch.add(a, a, out=out)
    elapsed = time.perf_counter() - start
    _sync(device)
    return elapsed / count * 1e6


def _host_memory_gib() -> float:
    """The node's physical memory, GiB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _memory_gib(device: torch.device, ranks_per_node: int) -> float:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory) / 2**30
    return _host_memory_gib() / ranks_per_node


def measure_device(device: torch.device, ranks_per_node: int, seconds_per_item: float) -> DeviceMeasurements:
    """Every compute figure of the probe for this rank's device."""
    threads = None
    if device.type == "cpu":
        threads = max(1, (os.cpu_count() or 1) // ranks_per_node)
        torch.set_num_threads(threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fwd, bwd, shape = _attention(device, dtype, seconds_per_item)
    return DeviceMeasurements(
        kind="cuda" if device.type == "cuda" else "cpu",
        name=device_name(device),
        dtype=str(dtype).removeprefix("torch."),
        threads=threads,
        gemm=_gemms(device, dtype, seconds_per_item),
        attention_fwd_tflops=fwd,
        attention_bwd_tflops=bwd,
        memory_copy_gbps=_memory_copy_gbps(device, seconds_per_item),
        memory_gib=_memory_gib(device, ranks_per_node),
        host_overhead_us=_host_overhead_us(device),
        attention_shape=shape,
        host_memory_gib=_host_memory_gib(),
        host_memory_copy_gbps=_host_memory_copy_gbps(ranks_per_node, seconds_per_item),
        host_device_copy_gbps=_host_device_copy_gbps(device, seconds_per_item),
    )
