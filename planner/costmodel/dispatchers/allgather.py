"""``allgather``: Megatron-Core's all-gather dispatcher (``MoEAllGatherTokenDispatcher``): every rank
gathers all tokens of the EP x TP group, runs its experts on those routed to them, and a reduce-scatter
brings each token's output home.

Copies per source token, one direction: (P*t - 1), split by where the other ranks live: (P - r)*t
off the node, the rest on NVLink. Router and permutation: 31 forward kernels, as the all-to-all's.
"""

from __future__ import annotations

from planner.costmodel.dispatchers._base import DispatchCopies, Dispatcher, RoutingShape

__all__ = ["DISPATCHER", "AllGather"]


class AllGather(Dispatcher):
    kind = "allgather"
    summary = "all-gather of every token over the EP x TP group, reduce-scatter back (Megatron's allgather)"
    router_kernels = 31
    megatron_type = "allgather"

    def copies(self, shape: RoutingShape) -> DispatchCopies:
        p, r = shape.ep, shape.ep_ranks_per_node
        world = p * shape.tp
        remote = (p - r) * shape.tp
        return DispatchCopies(inter_node=shape.keep * remote, intra_node=shape.keep * (world - remote - 1))


DISPATCHER = AllGather()
