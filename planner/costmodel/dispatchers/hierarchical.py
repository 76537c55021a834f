"""``hierarchical``: node-deduplicated dispatch, DeepEP or NVIDIA Hybrid-EP (DeepSeek-V3, arXiv
2412.19437 §3.2.2; ``deepseek-ai/DeepEP`` branch ``hybrid-ep``; ``../shared/reference/seeds.md`` §3.1).

Copies per source token, one direction (seeds §6.2, exact for uniform top-k routing): one copy per
distinct remote node, ``D(N) - p_n`` (p_n = P(own node hit)), on the scale-out link; in the node, one
copy per distinct target rank other than self, including forwarding on the receiving node:
``D(P) - N*p_r`` (p_r = P(a rank is hit)). ``D(X)`` is ``routing.expected_distinct``.

Its dispatch sends BF16 rows under FP8 training too, as Megatron-Core and torchtitan run it
(``expert_comm.DISPATCH_BYTES``; DeepSeek-V3's own FP8 dispatch is not what they run). Its
preprocessing is fused: 17 router and dispatch kernels (the GB200 guide §2.2.1: "further ... to 17").
SMs (``COMM_SMS``, held while overlapped): Megatron-Core 0.16's defaults, DeepEP 20 (``moe_deepep_num_sms``;
DeepSeek-V3 report §3.2.2: "only 20 SMs are sufficient to fully utilize the bandwidths of IB and NVLink")
and Hybrid-EP 16 (``moe_hybridep_num_sms``: "In pure NVL scenarios, 16 SMs can generally achieve good
bandwidth"). A spec's own count (``num_sms``) below those reaches that share of the bandwidth
(``bandwidth_share``: the kernels copy at a rate per SM until the links saturate, an inference from the
sources' saturation figures, not a measured curve); above them it gains nothing and holds more SMs.
Buffers: DeepEP's default NVLink + RDMA buffers, 1e9 + 1e9 bytes (deepseek-ai/DeepEP tests).

Hardware: both libraries move in-node traffic over NVLink (DeepEP README: "NVLink for intranode
communication"); DeepEP runs on Ampere (SM80) and Hopper (SM90) (its README's requirements); Hybrid-EP's
kernels are TMA warp-specialised (global->shared loads and shared->remote stores by TMA, seeds §3.1),
and TMA is Hopper's (SM90) and later.
"""

from __future__ import annotations

from planner.costmodel.dispatchers._base import DispatchCopies, Dispatcher, RoutingShape
from planner.costmodel.routing import p_hit
from planner.schema import DispatcherSpec, GpuSpec, ModelSpec, ParallelConfig

__all__ = ["BUFFER_BYTES", "DISPATCHER", "Hierarchical"]

BUFFER_BYTES = 2e9
"""DeepEP's default NVLink + RDMA buffers (1e9 + 1e9 bytes, deepseek-ai/DeepEP tests)."""
COMM_SMS = {"deepep": 20, "hybridep": 16}
"""SMs each backend's kernels run on unless the spec says (``DispatcherSpec.num_sms``), and the SMs that
reach the links' full bandwidth (sources in the module docstring)."""
LEAST_CAPABILITY = {"deepep": (8, 0), "hybridep": (9, 0)}
"""Compute capability each backend's kernels need (sources in the module docstring)."""
LIBRARY_NAMES = {"deepep": "DeepEP", "hybridep": "Hybrid-EP"}


class Hierarchical(Dispatcher):
    kind = "hierarchical"
    summary = "node-deduplicated dispatch: a token crosses to each node once (DeepEP / Hybrid-EP)"
    backends = ("deepep", "hybridep")
    default_backend = "deepep"  # Megatron's --moe-flex-dispatcher-backend default
    router_kernels = 17
    overlappable = True
    megatron_type = "flex"
    torchtitan_backends = {None: "deepep", "deepep": "deepep"}

    def copies(self, shape: RoutingShape) -> DispatchCopies:
        e, k, p, r = shape.num_experts, shape.topk, shape.ep, shape.ep_ranks_per_node
        n = p // r
        per_rank = e // p
        p_rank = p_hit(e, k, per_rank, shape.num_groups, shape.group_topk)
        p_node = p_hit(e, k, per_rank * r, shape.num_groups, shape.group_topk)
        inter = n * p_node - p_node  # distinct remote nodes
        intra = p * p_rank - n * p_rank  # distinct target ranks, minus self and remote peers
        return DispatchCopies(inter_node=shape.keep * inter, intra_node=shape.keep * intra)

    def comm_sms(self, spec: DispatcherSpec) -> int:
        return spec.num_sms or COMM_SMS[spec.backend or "deepep"]

    def bandwidth_share(self, spec: DispatcherSpec) -> float:
        return min(1.0, self.comm_sms(spec) / COMM_SMS[spec.backend or "deepep"])

    def buffer_bytes(self, routed_bytes: float) -> float:
        return BUFFER_BYTES

    def rules(self, model: ModelSpec, parallel: ParallelConfig) -> list[str]:
        return ["needs ep above 1"] if parallel.ep == 1 else []

    def hardware_rules(self, spec: DispatcherSpec, gpu: GpuSpec) -> list[str]:
        backend = spec.backend or self.default_backend
        assert backend is not None
        library, broken = LIBRARY_NAMES[backend], []
        if gpu.nvlink is False:
            broken.append(f"on {library} needs NVLink between the GPUs of a node, which {gpu.name} has not")
        if spec.num_sms is not None and gpu.num_sms is not None and spec.num_sms >= gpu.num_sms:
            broken.append(
                f"num_sms ({spec.num_sms}) must leave SMs for compute: {gpu.name} has {gpu.num_sms}"
            )
        need, have = LEAST_CAPABILITY[backend], gpu.capability
        if have is not None and have < need:
            broken.append(
                f"on {library} needs compute capability {need[0]}.{need[1]} or more ({gpu.name} has "
                f"{gpu.compute_capability})"
            )
        return broken

    def variants(
        self,
        backends: tuple[str, ...] | None,
        chunk_counts: tuple[int, ...],
        overlap: bool,
    ) -> list[DispatcherSpec]:
        allowed = [b for b in self.backends if backends is None or b in backends]
        if not overlap and len(allowed) > 1:
            # DeepEP and Hybrid-EP move the same bytes; they differ only in the SMs they hold while
            # overlapped with compute, so without overlap one of them (Hybrid-EP) stands for both.
            allowed = ["hybridep"]
        return [DispatcherSpec.model_validate({"kind": self.kind, "backend": b}) for b in allowed]


DISPATCHER = Hierarchical()
