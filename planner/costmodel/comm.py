"""Time of one collective on a process group, from the link classes' alpha-beta fits.

nccl-tests conventions (``../shared/reference/ecosystem.md`` §4.1): for a collective whose
algorithm size is S bytes on n ranks, ``t = latency + S * factor / busbw`` with factor
``2(n-1)/n`` (all_reduce), ``(n-1)/n`` (all_gather, reduce_scatter; S = the gathered size), and for
all_to_all the bytes a rank sends to others over ``busbw``.

Groups that span nodes: a ring crosses the scale-out link once per node per ring, and NCCL runs one
ring per NIC, so with r group members per node (each with its own NIC) the ring's bus bandwidth is
``min(B_intra, r * B_inter)`` (DGX H100: min(370, 8 x 48) ~ 370, the "~370-390 GB/s" multi-node
busbw of ecosystem.md §4.3). An all-to-all sends each rank's remote share over its own NIC
("alltoall cannot aggregate the bandwidth of multiple NICs", NVIDIA/nccl-tests#267) while the local
share uses NVLink at the same time: ``t = latency + max(remote/B_inter, local/B_intra)``.
"""

from __future__ import annotations

from planner.costmodel.geometry import GroupGeometry
from planner.schema import ClusterProfile, CollectiveKind

__all__ = ["link_time", "p2p_time", "ring_bytes", "ring_time"]

_RING_FACTOR = {"all_reduce": 2.0, "all_gather": 1.0, "reduce_scatter": 1.0}


def _fit(cluster: ClusterProfile, link: str, kind: CollectiveKind) -> tuple[float, float]:
    """(latency s, busbw B/s) of a collective on a link class."""
    fit = cluster.links[link].collectives[kind]  # type: ignore[index]
    return fit.latency_us * 1e-6, fit.bandwidth_gbps * 1e9


def ring_time(
    cluster: ClusterProfile, kind: CollectiveKind, size_bytes: float, group: GroupGeometry
) -> float:
    """all_reduce / all_gather / reduce_scatter of ``size_bytes`` (the full buffer) over ``group``."""
    n = group.size
    if n <= 1 or size_bytes <= 0:
        return 0.0
    latency, busbw = _fit(cluster, "intra_node", kind)
    if group.crosses_nodes:
        inter_latency, inter_bw = _fit(cluster, "inter_node", kind)
        latency = inter_latency
        busbw = min(busbw, group.ranks_per_node * inter_bw) if group.ranks_per_node > 1 else inter_bw
    return latency + size_bytes * _RING_FACTOR[kind] * (n - 1) / n / busbw


def ring_bytes(kind: CollectiveKind, size_bytes: float, group: GroupGeometry) -> dict[str, float]:
    """Bytes one rank sends per link class in a ring ``kind`` of ``size_bytes`` over ``group``.

    A rank sends ``factor * (n-1)/n`` of the buffer to its ring neighbour (nccl-tests' busbw factors).
    A ring over N nodes crosses between nodes on N of its n hops, so on average N/n of each rank's
    bytes leave the node (the runtime's traffic meter counts its rings the same way).
    """
    n = group.size
    if n <= 1 or size_bytes <= 0:
        return {}
    sent = size_bytes * _RING_FACTOR[kind] * (n - 1) / n
    if not group.crosses_nodes:
        return {"intra_node": sent}
    inter = sent * group.num_nodes / n
    return {"inter_node": inter, "intra_node": sent - inter} if sent > inter else {"inter_node": inter}


def link_time(cluster: ClusterProfile, kind: CollectiveKind, intra_bytes: float, inter_bytes: float) -> float:
    """Bytes a rank sends concurrently over NVLink and its NIC: latency + the slower of the two."""
    if intra_bytes <= 0 and inter_bytes <= 0:
        return 0.0
    latency, intra_bw = _fit(cluster, "intra_node", kind)
    inter = 0.0
    if inter_bytes > 0:
        inter_latency, inter_bw = _fit(cluster, "inter_node", kind)
        latency, inter = max(latency, inter_latency), inter_bytes / inter_bw
    return latency + max(intra_bytes / intra_bw, inter)


def p2p_time(cluster: ClusterProfile, size_bytes: float, crosses_nodes: bool) -> float:
    """One send/recv of ``size_bytes``."""
    latency, bw = _fit(cluster, "inter_node" if crosses_nodes else "intra_node", "send_recv")
    return latency + size_bytes / bw
