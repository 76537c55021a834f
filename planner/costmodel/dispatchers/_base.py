"""What every token dispatcher of the cost model provides, and the pieces the kinds share.

A dispatcher kind is one module of this package (``alltoall.py``, ...) holding a ``DISPATCHER``: an
instance of a ``Dispatcher`` subclass that answers, for that algorithm and nothing else,

- ``copies``: how many copies of a source token's hidden vector cross each link class per dispatch
  (the combine moves the same rows back), the traffic formula;
- ``one_way_seconds``: how long one dispatch (or combine) of those bytes takes;
- ``router_kernels``: forward kernels of the router and dispatch preprocessing (host-launch cost);
- ``comm_sms``: SMs its kernels hold while overlapped with compute; ``bandwidth_share``: the share of the
  links' bandwidth they reach on those SMs;
- ``buffer_bytes``: the communication buffers it keeps on the GPU;
- ``rules``: the layouts it needs (broken rules as sentences);
- ``hardware_rules``: what its kernel library needs of the GPU;
- ``variants``: the ``DispatcherSpec``s the search tries for it;
- the names the launch formats know it by (``megatron_type``, ``torchtitan_backends``).

Notation (``../shared/reference/seeds.md`` §6.0): P ranks in the EP group over N nodes with r = P/N
ranks per node; E experts, k per token, placed contiguously (E/P per rank); t TP ranks.
Condensation (Luffy) multiplies every copy by (1 - rho); topology-aware routing (TA-MoE) replaces the
uniform off-node share of a flat dispatch's non-local copies (``routing.topology_aware_remote_fraction``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from planner.costmodel import comm
from planner.schema import ClusterProfile, CollectiveKind, DispatcherSpec, GpuSpec, ModelSpec, ParallelConfig

__all__ = [
    "DEFAULT_COMM_SMS",
    "UNFUSED_ROUTER_KERNELS",
    "DispatchCopies",
    "Dispatcher",
    "RoutingShape",
    "flat_split",
]

UNFUSED_ROUTER_KERNELS = 72 - 31
"""Forward kernels of the router that ``--moe-router-fusion`` fuses away: "reducing the total number of
kernels in the router part from 72 to 31" (Megatron-LM's DeepSeek-V3 GB200 guide §2.1.4, at eb0783b6). Each
kind's ``router_kernels`` counts the fused router; without fusion the host launches these on top (the
same for every kind: the fusion is the router's, the dispatcher's preprocessing is not touched)."""

DEFAULT_COMM_SMS = 16
"""SMs NCCL's all-to-all kernels hold while overlapped (assumed: NCCL's channel count on NVSwitch
systems; not measured here)."""


@dataclass(frozen=True, slots=True)
class DispatchCopies:
    """Copies of one source token's hidden vector leaving its GPU, per link class, one direction."""

    inter_node: float
    """Copies over the scale-out link."""
    intra_node: float
    """Copies over the scale-up link (NVLink), forwarding included."""
    tp_allgather: float = 0.0
    """Copies received by the TP all-gather that rebuilds deduplicated tokens (monta), intra-node."""


@dataclass(frozen=True, slots=True)
class RoutingShape:
    """What the volume of one dispatch depends on: the model's routing and the EP group's placement.

    Copies are counted per token of a rank's 1/t share of its TP group's sequence (``tokens / tp``).
    """

    num_experts: int
    topk: int
    ep: int
    ep_ranks_per_node: int
    tp: int = 1
    tp_duplicates: bool = False
    """The TP ranks hold the same tokens (TP without sequence parallelism)."""
    capacity_factor: float | None = None
    num_groups: int = 1
    group_topk: int = 1
    remote_fraction: float | None = None
    """Off-node share of the non-local copies under topology-aware routing; None: uniform routing."""
    condense_fraction: float = 0.0

    @property
    def keep(self) -> float:
        """The share of copies condensation leaves."""
        return 1.0 - self.condense_fraction


def flat_split(copies: float, shape: RoutingShape) -> tuple[float, float]:
    """(inter-node, intra-node) copies of a flat all-to-all sending ``copies`` copies per token.

    A fraction (P-1)/P of them leave the GPU; of those, uniform routing sends (P-r)/(P-1) off the node
    (or the topology-aware share).
    """
    p, r = shape.ep, shape.ep_ranks_per_node
    non_local = copies * (p - 1) / p
    remote = shape.remote_fraction
    if remote is None:
        remote = (p - r) / (p - 1) if p > 1 else 0.0
    return non_local * remote, non_local * (1 - remote)


class Dispatcher:
    """A token dispatcher as the cost model, the rules, the search and the emitters see it."""

    kind: ClassVar[str]
    """The schema's ``DispatcherSpec.kind``."""
    summary: ClassVar[str]
    """One line for people (``moeplan solve --help``, reports)."""
    backends: ClassVar[tuple[str, ...]] = ()
    """Kernel libraries it can run on (``DispatcherSpec.backend``); empty: none to choose."""
    default_backend: ClassVar[str | None] = None
    """The backend a spec without one runs on (Megatron's default)."""
    router_kernels: ClassVar[int]
    """Forward kernels of the router and dispatch preprocessing, launched from Python."""
    overlappable: ClassVar[bool] = False
    """Megatron's ``--overlap-moe-expert-parallel-comm`` can hide it behind another micro-batch."""
    deduplicates_tp: ClassVar[bool] = False
    """It removes the duplicate tokens TP ranks hold without sequence parallelism, so it runs with
    sequence parallelism off (MoNTA; Megatron-LM requires SP for MoE with TP, DeepSpeed-MoE does not)."""
    megatron_type: ClassVar[str | None]
    """Megatron-LM's ``--moe-token-dispatcher-type`` for it; None: Megatron-LM has no equivalent."""
    megatron_refusal: ClassVar[str] = ""
    """Why Megatron-LM cannot run it and what to do instead (when ``megatron_type`` is None)."""
    torchtitan_backends: ClassVar[dict[str | None, str]] = {}
    """torchtitan's ``expert_parallel_comm_backend`` per backend of this kind; absent: no equivalent."""
    etp_collectives: ClassVar[tuple[CollectiveKind, ...]] = ("all_gather", "reduce_scatter")
    topology_aware: ClassVar[bool] = False
    """TA-MoE's topology-aware routing changes its traffic (it splits copies as a flat all-to-all does)."""
    """What expert tensor parallelism adds around the sharded experts: all-gather the routed rows of the
    ETP peers, reduce-scatter the partial outputs (Megatron's alltoall dispatcher)."""

    def copies(self, shape: RoutingShape) -> DispatchCopies:
        """Copies per source token for one dispatch (the combine is symmetric)."""
        raise NotImplementedError

    def one_way_seconds(
        self,
        cluster: ClusterProfile,
        intra_bytes: float,
        inter_bytes: float,
        gather_bytes: float,
        chunks: int,
    ) -> float:
        """One dispatch (or combine) sending ``intra_bytes`` over NVLink and ``inter_bytes`` over the NIC
        concurrently (``gather_bytes``: a TP all-gather's, for kinds that have one)."""
        return comm.link_time(cluster, "all_to_all", intra_bytes, inter_bytes)

    def comm_sms(self, spec: DispatcherSpec) -> int:
        """SMs its kernels hold while overlapped with compute."""
        return DEFAULT_COMM_SMS

    def bandwidth_share(self, spec: DispatcherSpec) -> float:
        """The share of the links' bandwidth its kernels reach with ``spec``'s SMs (1: all of it)."""
        return 1.0

    def buffer_bytes(self, routed_bytes: float) -> float:
        """GPU bytes of its communication buffers; ``routed_bytes``: one direction's routed rows."""
        return 2.0 * routed_bytes  # the dispatched rows and the rows coming back

    def hardware_rules(self, spec: DispatcherSpec, gpu: GpuSpec) -> list[str]:
        """What the kernel library of ``spec`` needs of the GPU, as broken rules (none by default)."""
        return []

    def rules(self, model: ModelSpec, parallel: ParallelConfig) -> list[str]:
        """The rules of this kind that the layout breaks, as sentences (``dispatcher (kind) <rule>``)."""
        return []

    def variants(
        self,
        backends: tuple[str, ...] | None,
        chunk_counts: tuple[int, ...],
        overlap: bool,
    ) -> list[DispatcherSpec]:
        """The specs the search tries for this kind, overlapped with compute or not.

        ``backends``: the ones the user allowed (None: all). Model-altering techniques are added by the
        search (``planner.search.space.offered``), with and without, to every spec.
        """
        return [DispatcherSpec(kind=self.kind)]
