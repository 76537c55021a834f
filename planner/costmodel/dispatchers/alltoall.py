"""``alltoall``: the flat NCCL all-to-all, one row per (token, expert) pair (Megatron-Core's
``MoEAlltoAllTokenDispatcher``; DeepSpeed/GShard).

Copies per source token, one direction: k; a fraction (P-r)/P leave the node, (r-1)/P stay on NVLink,
1/P are local. Without sequence parallelism each of the t TP ranks sends the same tokens (t
duplicates), the volume MoNTA removes. Router and permutation: 31 forward kernels with Megatron's router
fusion (Megatron-LM GB200 DeepSeek-V3 guide §2.1.4: "reducing the total number of kernels in the router
part from 72 to 31").
"""

from __future__ import annotations

from planner.costmodel.dispatchers._base import DispatchCopies, Dispatcher, RoutingShape, flat_split

__all__ = ["DISPATCHER", "AllToAll"]


class AllToAll(Dispatcher):
    kind = "alltoall"
    summary = "flat NCCL all-to-all: one row per (token, expert) pair"
    router_kernels = 31
    topology_aware = True
    overlappable = True
    megatron_type = "alltoall"
    torchtitan_backends = {None: "standard"}

    def copies(self, shape: RoutingShape) -> DispatchCopies:
        inter, intra = flat_split(float(shape.topk), shape)
        duplicates = shape.tp if shape.tp_duplicates else 1
        return DispatchCopies(
            inter_node=shape.keep * inter * duplicates, intra_node=shape.keep * intra * duplicates
        )


DISPATCHER = AllToAll()
