"""``monta``: MoNTA's TP-deduplicated all-to-all pipelined with the intra-node all-gather (MoNTA, arXiv
2411.00662; seeds §1.1, §1.3, §6.5).

With attention TP of t ranks and no sequence parallelism the t TP ranks hold the same tokens; each
sends only its 1/t share through the flat EP all-to-all (flat volumes of its share), and an all-gather
inside the TP group rebuilds the full set: each rank receives the other t-1 ranks' routed copies.
Capacity padding (DeepSpeed's GShard layout, MoNTA's baseline) multiplies k by the capacity factor.

Time of one direction in C chunks (``one_way_seconds``):
``T(n) = (T_a2a + T_ag)/n + (n-1) max(T_a2a, T_ag)/n + n alpha``, and never below the time the NVLink
needs for the bytes both steps put on it (the link-sharing bound).
"""

from __future__ import annotations

from planner.costmodel.dispatchers._base import DispatchCopies, Dispatcher, RoutingShape, flat_split
from planner.schema import ClusterProfile, DispatcherSpec, ModelSpec, ParallelConfig

__all__ = ["DISPATCHER", "MoNTA"]


class MoNTA(Dispatcher):
    kind = "monta"
    summary = "TP-deduplicated all-to-all pipelined with the TP all-gather in chunks (MoNTA)"
    router_kernels = 31
    topology_aware = True
    deduplicates_tp = True
    megatron_type = None
    etp_collectives = ("reduce_scatter",)  # its pipelined TP all-gather already rebuilt the tokens
    megatron_refusal = (
        "has no Megatron-LM equivalent: Megatron's token dispatchers are allgather, alltoall and flex "
        "(DeepEP/HybridEP); re-plan with --dispatcher alltoall or hierarchical, or launch moeplan's "
        "own runtime (emit torchrun)"
    )

    def copies(self, shape: RoutingShape) -> DispatchCopies:
        copies = float(shape.topk)
        if shape.capacity_factor is not None:
            copies *= shape.capacity_factor  # DeepSpeed's GShard layout pads every expert to capacity
        inter, intra = flat_split(copies, shape)
        keep = shape.keep
        return DispatchCopies(
            inter_node=keep * inter, intra_node=keep * intra, tp_allgather=keep * copies * (shape.tp - 1)
        )

    def one_way_seconds(
        self,
        cluster: ClusterProfile,
        intra_bytes: float,
        inter_bytes: float,
        gather_bytes: float,
        chunks: int,
    ) -> float:
        a2a = super().one_way_seconds(cluster, intra_bytes, inter_bytes, 0.0, chunks)
        if not gather_bytes:
            return a2a
        fit = cluster.links["intra_node"].collectives["all_gather"]
        alpha = fit.latency_us * 1e-6
        gather = gather_bytes / (fit.bandwidth_gbps * 1e9)
        a2a_wire = max(0.0, a2a - alpha)
        n = max(chunks, 1)
        pipelined = (a2a_wire + gather) / n + (n - 1) * max(a2a_wire, gather) / n + n * 2 * alpha
        shared_link = (intra_bytes + gather_bytes) / (
            cluster.links["intra_node"].collectives["all_to_all"].bandwidth_gbps * 1e9
        )
        return max(pipelined, shared_link)

    def rules(self, model: ModelSpec, parallel: ParallelConfig) -> list[str]:
        broken = []
        if parallel.ep == 1:
            broken.append("needs ep above 1")
        if parallel.tp == 1:
            broken.append("deduplicates tokens over the TP group, so it needs tp above 1")
        return broken

    def variants(
        self,
        backends: tuple[str, ...] | None,
        chunk_counts: tuple[int, ...],
        overlap: bool,
    ) -> list[DispatcherSpec]:
        return [DispatcherSpec(kind=self.kind, num_chunks=n) for n in chunk_counts]


DISPATCHER = MoNTA()
