"""Expert-parallel token dispatchers: move (token, expert) pairs to the experts' ranks and back.

Every class here implements :class:`~planner.runtime.protocols.TokenDispatcher`::

    out[t] = sum_j weights[t, j] * expert[expert_ids[t, j]](tokens[t])

with autograd-correct communication: each collective is a ``torch.autograd.Function`` whose backward is
the transposed collective, so gradients reach the tokens, the combine weights and the expert
parameters exactly as :class:`LocalDispatcher` (one process, no communication) gives them. They run on
gloo (CPU) and NCCL (GPU) alike: only ``all_to_all_single`` with uneven splits and list-form
``all_gather``; the split sizes are copied to the host once per exchange (gloo and NCCL both take them
as Python ints), never per token.

Why not ``torch.distributed.nn.functional``: in torch 2.13 its ``all_to_all_single`` and ``all_gather``
raise ``FutureWarning`` on every call (pointing at ``_functional_collectives``, whose autograd variants
are private), and none of them can be issued asynchronously; MoNTA needs that. The Functions below are
a few lines each.

Placement. An EP group of P members holds E experts, ``L = E / P`` per member: expert ``e`` is local
expert ``e % L`` of member ``e // L``. Ranks are node-contiguous, ``node_of(r) = r // ranks_per_node``.

Legend: T tokens, H hidden, K top-k, L local experts per member, P EP members, N nodes spanned by the
EP group, G EP members per node, t TP size, C chunks, b bytes per token element, b_w per weight.

Algorithms and the bytes one rank sends per forward call, by :class:`TrafficMeter` kind. The backward
runs the transposed collectives, counted as ``"<kind>_backward"``: a rank sends back (gradients of) what
it received, so its ``dispatch_backward`` bytes are its ``combine`` bytes and vice versa (integer
metadata has no gradient).

:class:`LocalDispatcher` (P = 1). Sort the T*K pairs by expert, run the experts, weight, scatter-add.

:class:`AllToAllDispatcher`, flat all-to-all (Megatron-Core ``MoEAlltoAllTokenDispatcher``,
``megatron/core/transformer/moe/token_dispatcher.py``; DeepSpeed/GShard). Exchange the per-(member,
local expert) counts (an equal-split all-to-all of int64), then one all-to-all with uneven splits
carrying one row per (token, expert) pair, regroup by local expert, run the experts, send the rows
back with the inverse all-to-all, weight and sum at home.
``dispatch = combine = sum over kept pairs whose member != me of H*b`` (split by the member's node),
``counts = (P - 1) * L * 8``. Optional capacity: per source rank and expert, the first
``ceil(capacity_factor * T*K / E)`` pairs in token order are kept (Megatron's ``get_capacity`` with
the "position" drop policy); dropped pairs contribute zero.

:class:`HierarchicalDispatcher`, node-deduplicated two-phase dispatch (DeepEP internode / NVIDIA
Hybrid-EP, ``deepseek-ai/DeepEP`` branch ``hybrid-ep`` ``docs/Hybrid-EP_Implementation.md``; DeepSeek-V3,
arXiv 2412.19437 §3.2.2; ``../shared/reference/seeds.md`` §3.1, §6.2). Phase 1 over the *cross* group
(the members with my local index on every node): one copy per distinct (token, destination node) goes
to my peer on that node, with K metadata slots (node-local expert id as int32, -1 when unused, and the
combine weight). Phase 2 over the *intra* group (the EP members of my node): each received copy goes
once to each member that holds one of its experts. The expert rank weights its outputs and sums them
per row; the forwarder sums its members' rows; each (token, node) comes back as one pre-reduced row.
``dispatch inter = #distinct (token, node != mine) * (H*b + K*(b_w + 4))``,
``dispatch intra = #distinct (received copy, member != me) * (H*b + K*(b_w + 4))``,
``combine``: one ``H*b`` row back per copy (sent by the copy's receiver), ``counts = (N - 1)*8 +
(G - 1)*8``. Flat sends ``#(pair, remote node) * H*b`` inter-node, so hierarchical sends less when the
pairs per distinct (token, remote node) average more than ``1 + K*(b_w + 4) / (H*b)``: many experts per
node and top-K >= 2 (true for real H; a toy H can make the metadata outweigh the saving). One node:
phase 1 is a local copy and this is an intra-node all-to-all with per-rank deduplication.

:class:`MoNTADispatcher`, TP-duplicate dropping with a pipelined all-gather (MoNTA, arXiv 2411.00662;
DeepSpeed PR #5626 ``drop_tokens``/``gather_tokens``; ``EnflameTechnology/DeepSpeed`` commit ``f7336153``
``pipeline_alltoall_with_allgather``; seeds.md §1.1, §6.3). With attention TP of size t and no sequence
parallelism, the t TP ranks hold the same T tokens; TP rank r sends only its ``1/t`` slice through the
flat EP all-to-all, and an all-gather inside the TP group (intra-node when TP is inside a node, as
Megatron places it) rebuilds all T outputs. The
combine is cut into C chunks of the slice: every chunk's all-to-all is issued asynchronously up front
(as DeepSpeed does), and chunk c's all-gather is issued as soon as its all-to-all lands, so it runs
while the all-to-alls of chunks c+1.. are still in flight.
``dispatch = combine = the flat formula over T/t tokens`` (summed over the t TP peers: one duplicated
sender's bytes, i.e. 1/t of the undeduplicated total), ``all_gather = (t - 1) * T/t * H*b``,
``counts = (P - 1) * C * L * 8``.

:class:`Condensing`, Luffy token condensation (Chen et al., arXiv 2411.15419 §4.2; seeds.md §4.2): among
the pairs of one expert, a token whose cosine similarity to an earlier kept token of that expert
exceeds the threshold is not sent; it reuses the expert output of its most similar representative.
Bytes scale by the kept fraction. Model-altering (an approximation), opt-in.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

from planner.runtime.meter import TrafficMeter, node_of
from planner.runtime.protocols import ExpertFn, TokenDispatcher

__all__ = [
    "AllToAllDispatcher",
    "Condensing",
    "HierarchicalDispatcher",
    "HierarchicalGroups",
    "LocalDispatcher",
    "MoNTADispatcher",
    "capacity_keep_mask",
    "hierarchical_groups",
]

# ---------------------------------------------------------------------------------------------------
# Collectives with autograd


@dataclass(frozen=True)
class _Comm:
    """A process group with the global ranks of its members (in group-rank order) and the meter."""

    group: dist.ProcessGroup
    ranks: tuple[int, ...]
    rank: int
    """This process's index in ``ranks``."""
    meter: TrafficMeter | None

    @classmethod
    def of(cls, group: dist.ProcessGroup, meter: TrafficMeter | None) -> _Comm:
        ranks = tuple(dist.get_process_group_ranks(group))
        return cls(group=group, ranks=ranks, rank=ranks.index(dist.get_rank()), meter=meter)

    @property
    def size(self) -> int:
        return len(self.ranks)


def _synchronizer(x: Tensor) -> Callable[[], None] | None:
    # Timing a collective on a GPU needs the device drained before and after; on CPU (gloo) the
    # collective is synchronous with the host already.
    return functools.partial(torch.cuda.synchronize, x.device) if x.is_cuda else None


def _recorded_event() -> torch.cuda.Event:
    """A timing event recorded on the current CUDA stream."""
    event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    event.record()
    return event


class _Pending:
    """An asynchronously issued collective; ``wait()`` completes it.

    Its time goes to the meter at ``wait()`` on CPU (host clock from issue to completion: gloo's wait
    blocks the host) and at ``flush()`` on GPUs, from CUDA events, so that timing does not drain the
    device between pipelined collectives (a synchronize there would serialise MoNTA's overlap).
    """

    def __init__(
        self,
        work: Any,
        meter: TrafficMeter | None,
        kind: str,
        started: float = 0.0,
        start_event: torch.cuda.Event | None = None,
    ) -> None:
        self._work = work
        self._meter = meter
        self._kind = kind
        self._started = started
        self._start_event = start_event
        self._end_event: torch.cuda.Event | None = None

    def wait(self) -> None:
        if self._work is not None:
            self._work.wait()
        if self._meter is None:
            return
        if self._start_event is None:
            self._meter.stop(self._kind, self._started)
        else:
            self._end_event = _recorded_event()

    def flush(self) -> None:
        """Record a GPU collective's time (waits for its end event; a no-op on CPU)."""
        if self._meter is not None and self._start_event is not None and self._end_event is not None:
            self._end_event.synchronize()
            self._meter.add_time(self._kind, self._start_event.elapsed_time(self._end_event) / 1e3)
            self._end_event = None


_DONE = _Pending(None, None, "")


def _row_bytes(x: Tensor) -> int:
    return math.prod(x.shape[1:]) * x.element_size()


def _issue(
    comm: _Comm,
    kind: str,
    send_bytes: Sequence[int],
    like: Tensor,
    async_op: bool,
    launch: Callable[[], Any],
) -> _Pending:
    """Count ``send_bytes[i]`` bytes to member i, launch the collective and time it (``like``: its device)."""
    meter = comm.meter
    if meter is None:
        work = launch()
        return _Pending(work, None, kind) if async_op else _DONE
    meter.add_bytes(kind, comm.ranks, send_bytes)
    if not async_op:
        with meter.timed(kind, _synchronizer(like)):
            launch()
        return _DONE
    if like.is_cuda:
        start = _recorded_event()
        return _Pending(launch(), meter, kind, start_event=start)
    started = meter.start()
    return _Pending(launch(), meter, kind, started=started)


def _all_to_all_raw(
    x: Tensor, out_rows: list[int], in_rows: list[int], comm: _Comm, kind: str, async_op: bool
) -> tuple[Tensor, _Pending]:
    out = x.new_empty((sum(out_rows), *x.shape[1:]))
    x = x.contiguous()
    row = _row_bytes(x)
    pending = _issue(
        comm,
        kind,
        [n * row for n in in_rows],
        x,
        async_op,
        lambda: dist.all_to_all_single(
            out,
            x,
            output_split_sizes=out_rows,
            input_split_sizes=in_rows,
            group=comm.group,
            async_op=async_op,
        ),
    )
    return out, pending


class _AllToAll(torch.autograd.Function):
    """Uneven ``all_to_all_single``; the backward is the transposed (splits swapped) all-to-all."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        out_rows: list[int],
        in_rows: list[int],
        comm: _Comm,
        kind: str,
        pending: list[_Pending] | None,
    ) -> Tensor:
        ctx.out_rows, ctx.in_rows, ctx.comm, ctx.kind = out_rows, in_rows, comm, kind
        out, work = _all_to_all_raw(x, out_rows, in_rows, comm, kind, async_op=pending is not None)
        if pending is not None:
            pending.append(work)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        gx, _ = _all_to_all_raw(grad, ctx.in_rows, ctx.out_rows, ctx.comm, f"{ctx.kind}_backward", False)
        return gx, None, None, None, None, None


def _apply(function: type[torch.autograd.Function], *args: Any) -> Any:
    # torch types ``Function.apply`` loosely (untyped); the callers cast the result.
    return function.apply(*args)  # type: ignore[no-untyped-call]


def _all_to_all(x: Tensor, out_rows: list[int], in_rows: list[int], comm: _Comm, kind: str) -> Tensor:
    """Row i-block of ``x`` (``in_rows[i]`` rows) goes to member i; returns the received blocks in order."""
    if comm.size == 1:
        return x
    return cast(Tensor, _apply(_AllToAll, x, out_rows, in_rows, comm, kind, None))


def _all_to_all_start(
    x: Tensor, out_rows: list[int], in_rows: list[int], comm: _Comm, kind: str
) -> tuple[Tensor, _Pending]:
    """As :func:`_all_to_all`, issued asynchronously: the result is valid after ``pending.wait()``."""
    if comm.size == 1:
        return x, _DONE
    pending: list[_Pending] = []
    out = cast(Tensor, _apply(_AllToAll, x, out_rows, in_rows, comm, kind, pending))
    return out, pending[0]


def _exchange_counts(counts: Tensor, comm: _Comm) -> Tensor:
    """Equal-split all-to-all of ``counts`` [P, ...]: entry i goes to member i (no autograd: integers)."""
    if comm.size == 1:
        return counts
    counts = counts.contiguous()
    out = torch.empty_like(counts)
    _issue(
        comm,
        "counts",
        [_row_bytes(counts)] * comm.size,
        counts,
        False,
        lambda: dist.all_to_all_single(out, counts, group=comm.group),
    )
    return out


def _all_to_all_ints(x: Tensor, out_rows: list[int], in_rows: list[int], comm: _Comm, kind: str) -> Tensor:
    """Uneven all-to-all of integer metadata (no autograd)."""
    if comm.size == 1:
        return x
    out, _ = _all_to_all_raw(x, out_rows, in_rows, comm, kind, async_op=False)
    return out


def _split_sizes(n: int, parts: int) -> list[int]:
    """``torch.tensor_split`` sizes: the first ``n % parts`` parts get one more."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _gather_rows(
    x: Tensor, rows: list[int], comm: _Comm, kind: str, async_op: bool
) -> tuple[list[Tensor], _Pending]:
    """All-gather of ``x`` (``rows[comm.rank]`` rows) over ``comm``; every result is padded to ``max(rows)``
    rows (the list form of ``all_gather`` needs equal shapes), of which the first ``rows[i]`` are valid."""
    pad = max(rows) - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    x = x.contiguous()
    outs = [torch.empty_like(x) for _ in range(comm.size)]
    pending = _issue(
        comm,
        kind,
        [x.numel() * x.element_size()] * comm.size,  # the whole (padded) tensor to every peer
        x,
        async_op,
        lambda: dist.all_gather(outs, x, group=comm.group, async_op=async_op),
    )
    return outs, pending


class _TPGather(torch.autograd.Function):
    """All-gather of TP-sliced rows into TP-replicated rows (MoNTA's ``gather_tokens``).

    The result is *replicated*: every TP rank computes the same loss from it, and the gradient each TP
    rank holds for it is the full gradient. The gradient of this rank's slice is therefore its own rows
    of that gradient, not a sum over the TP group (DeepSpeed ``deepspeed/moe/mappings.py``:
    ``_GatherTokens.backward`` is ``drop_tokens``).
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, rows: list[int], comm: _Comm, kind: str, pending: list[_Pending]
    ) -> tuple[Tensor, ...]:
        ctx.rank, ctx.rows = comm.rank, x.shape[0]
        # Padded buffers, not views of them: the collective still writes into them after we return.
        outs, work = _gather_rows(x, rows, comm, kind, async_op=True)
        pending.append(work)
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        return grads[ctx.rank][: ctx.rows], None, None, None, None


class _TPDrop(torch.autograd.Function):
    """Keep this TP rank's slice of TP-replicated rows (MoNTA's ``drop_tokens``); backward all-gathers.

    The input is replicated across the TP group, so its gradient must be the full gradient on every TP
    rank: the slices' gradients are gathered, not summed (DeepSpeed ``_DropTokens.backward``).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, rows: list[int], comm: _Comm) -> Tensor:
        ctx.rows, ctx.comm = rows, comm
        start = sum(rows[: comm.rank])
        # A copy, not a view: the caller may index it freely and autograd owns a fresh tensor.
        return x.narrow(0, start, rows[comm.rank]).clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        parts, _ = _gather_rows(grad, ctx.rows, ctx.comm, "drop_backward", async_op=False)
        return torch.cat([part[:n] for part, n in zip(parts, ctx.rows, strict=True)]), None, None


# ---------------------------------------------------------------------------------------------------
# Routing helpers


def capacity_keep_mask(expert_ids: Tensor, num_experts: int, capacity_factor: float) -> Tensor:
    """Which of the T*K pairs (flattened token-major) fit their expert's capacity on this rank.

    ``capacity = ceil(capacity_factor * T*K / E)``; within each expert the first pairs in token order are
    kept (the "position" drop policy of Megatron-Core's ``moe_utils``).
    """
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor ({capacity_factor}) must be > 0")
    flat = expert_ids.reshape(-1)
    capacity = math.ceil(capacity_factor * flat.numel() / num_experts)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(flat)
    position[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    return position < capacity


def _inverse(order: Tensor) -> Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


def _weighted_sum(rows: Tensor, index: Tensor, weights: Tensor | None, num_rows: int) -> Tensor:
    """``out[index[i]] += weights[i] * rows[i]`` into ``num_rows`` rows, accumulated in the wider dtype."""
    acc = rows.dtype if weights is None else torch.promote_types(rows.dtype, weights.dtype)
    terms = rows.to(acc) if weights is None else rows.to(acc) * weights.to(acc).unsqueeze(-1)
    out = rows.new_zeros((num_rows, *rows.shape[1:]), dtype=acc).index_add(0, index, terms)
    return out.to(rows.dtype)


def _check_experts(num_experts: int, ep: int) -> int:
    if num_experts % ep:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by the EP group size ({ep})")
    return num_experts // ep


@dataclass(frozen=True)
class _FlatPlan:
    """The flat all-to-all's bookkeeping for one call (S sent rows, R received rows)."""

    pair_index: Tensor
    """[S] flat pair index ``t*K + j`` of each sent row, in send order (member, chunk, local expert)."""
    token_index: Tensor
    """[S] token of each sent row."""
    send_counts: list[list[list[int]]]
    """[P][C][L] rows sent to (member, chunk, local expert)."""
    recv_counts: list[list[list[int]]]
    """[P][C][L] rows received from (member, chunk, local expert)."""
    expert_order: Tensor
    """[R] permutation grouping the received rows by local expert (source order kept within)."""
    expert_counts: list[int]
    """[L] received rows per local expert."""

    @property
    def send_rows(self) -> list[int]:
        return [sum(sum(chunk) for chunk in member) for member in self.send_counts]

    @property
    def recv_rows(self) -> list[int]:
        return [sum(sum(chunk) for chunk in member) for member in self.recv_counts]


def _flat_plan(
    expert_ids: Tensor,
    keep: Tensor | None,
    chunk_of_token: Tensor | None,
    num_chunks: int,
    num_local: int,
    comm: _Comm,
) -> _FlatPlan:
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)
    if keep is None:
        pair = torch.arange(flat.numel(), device=flat.device)
    else:
        pair = keep.nonzero().squeeze(1)  # a device->host sync on GPUs; the splits need one anyway
    expert = flat[pair]
    member, local = expert // num_local, expert % num_local
    chunk = torch.zeros_like(pair) if chunk_of_token is None else chunk_of_token[pair // k]
    key = (member * num_chunks + chunk) * num_local + local
    order = torch.argsort(key, stable=True)
    pair = pair[order]
    counts = torch.bincount(key, minlength=comm.size * num_chunks * num_local)
    counts = counts.view(comm.size, num_chunks, num_local)
    recv = _exchange_counts(counts, comm)
    # The one device->host copy of the call: all-to-all split sizes are host ints on gloo and NCCL.
    send_counts, recv_counts = counts.tolist(), recv.tolist()
    recv_flat = recv.reshape(-1)
    labels = torch.arange(recv_flat.numel(), device=flat.device)
    row_local = torch.repeat_interleave(
        labels, recv_flat, output_size=sum(n for member in recv_counts for chunk in member for n in chunk)
    )
    row_local = row_local % num_local
    return _FlatPlan(
        pair_index=pair,
        token_index=pair // k,
        send_counts=send_counts,
        recv_counts=recv_counts,
        expert_order=torch.argsort(row_local, stable=True),
        expert_counts=recv.sum((0, 1)).tolist(),
    )


def _run_experts(x_recv: Tensor, plan: _FlatPlan, experts: ExpertFn) -> Tensor:
    """Received rows -> grouped by local expert -> experts -> back in received order."""
    y = experts(x_recv.index_select(0, plan.expert_order), plan.expert_counts)
    return y.index_select(0, _inverse(plan.expert_order))


# ---------------------------------------------------------------------------------------------------
# Dispatchers


class LocalDispatcher:
    """All experts in this process (EP = 1): the reference every distributed dispatcher must match.

    Parameters
    ----------
    num_experts
        E; ``experts`` receives ``counts`` of length E.
    capacity_factor
        ``None`` for dropless; otherwise pairs beyond ``ceil(capacity_factor * T*K / E)`` per expert are
        dropped (:func:`capacity_keep_mask`).
    """

    def __init__(self, num_experts: int, capacity_factor: float | None = None) -> None:
        if num_experts < 1:
            raise ValueError(f"num_experts ({num_experts}) must be >= 1")
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor

    def __call__(self, tokens: Tensor, expert_ids: Tensor, weights: Tensor, experts: ExpertFn) -> Tensor:
        k = expert_ids.shape[1]
        flat = expert_ids.reshape(-1)
        if self.capacity_factor is None:
            pair = torch.arange(flat.numel(), device=flat.device)
        else:
            pair = capacity_keep_mask(expert_ids, self.num_experts, self.capacity_factor).nonzero().squeeze(1)
        pair = pair[torch.argsort(flat[pair], stable=True)]
        counts = torch.bincount(flat[pair], minlength=self.num_experts).tolist()
        token = pair // k
        y = experts(tokens.index_select(0, token), counts)
        return _weighted_sum(y, token, weights.reshape(-1)[pair], tokens.shape[0])


class AllToAllDispatcher:
    """Flat expert-parallel all-to-all: one row per (token, expert) pair; see the module docstring.

    Parameters
    ----------
    ep_group
        The EP process group (``dist.group.WORLD`` for all ranks); its members' global ranks are read
        with ``dist.get_process_group_ranks``.
    num_experts
        E, divisible by the EP size.
    meter
        Counts the bytes and time of each collective (kinds ``dispatch``, ``combine``, ``counts``).
    capacity_factor
        ``None`` for dropless, otherwise the per-expert capacity factor (:func:`capacity_keep_mask`).
    """

    def __init__(
        self,
        ep_group: dist.ProcessGroup,
        num_experts: int,
        meter: TrafficMeter | None = None,
        capacity_factor: float | None = None,
    ) -> None:
        self._ep = _Comm.of(ep_group, meter)
        self.num_experts = num_experts
        self.num_local_experts = _check_experts(num_experts, self._ep.size)
        self.capacity_factor = capacity_factor

    def __call__(self, tokens: Tensor, expert_ids: Tensor, weights: Tensor, experts: ExpertFn) -> Tensor:
        keep = None
        if self.capacity_factor is not None:
            keep = capacity_keep_mask(expert_ids, self.num_experts, self.capacity_factor)
        plan = _flat_plan(expert_ids, keep, None, 1, self.num_local_experts, self._ep)
        send, recv = plan.send_rows, plan.recv_rows
        x_recv = _all_to_all(tokens.index_select(0, plan.token_index), recv, send, self._ep, "dispatch")
        y_recv = _run_experts(x_recv, plan, experts)
        y_back = _all_to_all(y_recv, send, recv, self._ep, "combine")
        return _weighted_sum(y_back, plan.token_index, weights.reshape(-1)[plan.pair_index], tokens.shape[0])


@dataclass(frozen=True)
class HierarchicalGroups:
    """The sub-groups of one EP group that :class:`HierarchicalDispatcher` communicates over.

    EP member ``m`` (position in the sorted ``ep_ranks``) is on node index ``m // members_per_node`` of
    the group and has local index ``m % members_per_node`` there.
    """

    ep_ranks: tuple[int, ...]
    ranks_per_node: int
    num_nodes: int
    """N: nodes the EP group spans."""
    members_per_node: int
    """G: EP members on each of those nodes."""
    member: int
    """This rank's position in ``ep_ranks``."""
    intra: dist.ProcessGroup | None
    """The EP members on this rank's node (``None`` when G = 1)."""
    cross: dist.ProcessGroup | None
    """The EP members with this rank's local index, one per node (``None`` when N = 1)."""


def _node_shape(ep_ranks: tuple[int, ...], ranks_per_node: int) -> tuple[int, int]:
    """(N nodes, G members per node) of an EP group; ValueError unless ascending and node-balanced."""
    if list(ep_ranks) != sorted(set(ep_ranks)):
        raise ValueError(f"EP group {list(ep_ranks)} must be strictly ascending")
    nodes: dict[int, int] = {}
    for r in ep_ranks:
        nodes[node_of(r, ranks_per_node)] = nodes.get(node_of(r, ranks_per_node), 0) + 1
    if len(set(nodes.values())) != 1:
        raise ValueError(
            f"EP group {list(ep_ranks)} must have the same number of members on every node it spans "
            f"(ranks_per_node {ranks_per_node}); members per node: {list(nodes.values())}"
        )
    return len(nodes), len(ep_ranks) // len(nodes)


def hierarchical_groups(
    ep_ranks_all: Sequence[Sequence[int]], ranks_per_node: int
) -> HierarchicalGroups | None:
    """Create the intra-node and cross-node sub-groups of every EP group; return this rank's.

    Collective over the whole world: ``dist.new_group`` must be called by every rank for every group in
    the same order, so **every rank must call this with the same arguments** (all EP groups of the
    layout, e.g. ``[[0, 1, 2, 3], [4, 5, 6, 7]]``). For each EP group in turn it creates the intra-node
    groups (node by node) and then the cross-node groups (local index by local index); size-1 groups are
    not created. Returns ``None`` on a rank that is in none of the groups.

    Each EP group must be ascending with the same number of members on each node it spans
    (node-contiguous placement, ``node_of(r) = r // ranks_per_node``).
    """
    groups = [tuple(ranks) for ranks in ep_ranks_all]
    shapes = [_node_shape(ranks, ranks_per_node) for ranks in groups]  # validate before any new_group
    me = dist.get_rank()
    mine: HierarchicalGroups | None = None
    for ranks, (num_nodes, per_node) in zip(groups, shapes, strict=True):
        intra = cross = None
        if per_node > 1:
            for n in range(num_nodes):
                members = list(ranks[n * per_node : (n + 1) * per_node])
                group = dist.new_group(members)
                intra = group if me in members else intra
        if num_nodes > 1:
            for local in range(per_node):
                peers = list(ranks[local::per_node])
                group = dist.new_group(peers)
                cross = group if me in peers else cross
        if me in ranks:
            mine = HierarchicalGroups(
                ep_ranks=ranks,
                ranks_per_node=ranks_per_node,
                num_nodes=num_nodes,
                members_per_node=per_node,
                member=ranks.index(me),
                intra=intra,
                cross=cross,
            )
    return mine


def _comm_or_self(group: dist.ProcessGroup | None, meter: TrafficMeter | None) -> _Comm:
    if group is None:
        rank = dist.get_rank()
        return _Comm(group=cast(dist.ProcessGroup, None), ranks=(rank,), rank=0, meter=meter)
    return _Comm.of(group, meter)


def _slot_hits(slot_target: Tensor, num_targets: int) -> Tensor:
    """[rows, num_targets] bool: which targets a row's K slots name (slot value -1 = unused)."""
    index = torch.where(slot_target >= 0, slot_target, num_targets).long()
    hits = torch.zeros((slot_target.shape[0], num_targets + 1), dtype=torch.bool, device=slot_target.device)
    return hits.scatter_(1, index, True)[:, :num_targets]


def _route_copies(
    rows: Tensor, slot_expert: Tensor, slot_weight: Tensor, experts_per_target: int, comm: _Comm, kind: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[int], list[int]]:
    """Send one copy of each row to each target (group member) that holds one of its slot experts.

    ``slot_expert`` [R, K] are expert ids numbered within the group (``target = id // experts_per_target``),
    -1 for unused slots; the copy to a target keeps the slots of that target's experts, renumbered
    within the target, and their weights. Returns the received rows, slot ids, slot weights, the source
    row of each sent copy (send order) and the send/recv split sizes.
    """
    target = torch.where(slot_expert >= 0, slot_expert // experts_per_target, -1)
    hits = _slot_hits(target, comm.size)
    copy_target, copy_row = hits.t().nonzero(as_tuple=True)  # target-major: the all-to-all's send order
    match = target.index_select(0, copy_row) == copy_target.unsqueeze(1)
    ids = slot_expert.index_select(0, copy_row) - (copy_target * experts_per_target).unsqueeze(1)
    send_ids = torch.where(match, ids, -1).to(torch.int32)
    send_weights = slot_weight.index_select(0, copy_row) * match
    send_counts = torch.bincount(copy_target, minlength=comm.size)
    # One device->host copy per phase for the split sizes.
    send = send_counts.tolist()
    recv = _exchange_counts(send_counts, comm).tolist()
    x = _all_to_all(rows.index_select(0, copy_row), recv, send, comm, kind)
    w = _all_to_all(send_weights, recv, send, comm, kind)
    s = _all_to_all_ints(send_ids, recv, send, comm, kind)
    return x, s, w, copy_row, send, recv


class HierarchicalDispatcher:
    """Node-deduplicated two-phase dispatch with in-node pre-reduced combine (DeepEP / Hybrid-EP style).

    A token crosses the inter-node link at most once per destination node and comes back as one
    pre-reduced row per node; see the module docstring for the algorithm and its byte formulas.

    Parameters
    ----------
    groups
        From :func:`hierarchical_groups` (collective over the world: call it on every rank).
    num_experts
        E, divisible by the EP size.
    meter
        Counts bytes and time (kinds ``dispatch``, ``combine``, ``counts``). Inter-node bytes are phase 1
        (cross group), intra-node bytes phase 2 (intra group).
    """

    def __init__(
        self, groups: HierarchicalGroups, num_experts: int, meter: TrafficMeter | None = None
    ) -> None:
        self.groups = groups
        self.num_experts = num_experts
        self.num_local_experts = _check_experts(num_experts, len(groups.ep_ranks))
        self._cross = _comm_or_self(groups.cross, meter)
        self._intra = _comm_or_self(groups.intra, meter)

    def __call__(self, tokens: Tensor, expert_ids: Tensor, weights: Tensor, experts: ExpertFn) -> Tensor:
        num_tokens = tokens.shape[0]
        per_member = self.num_local_experts
        per_node = per_member * self.groups.members_per_node
        # Phase 1 (inter-node): slots hold global expert ids; a node "holds" per_node of them.
        x1, s1, w1, copy1, send1, recv1 = _route_copies(
            tokens, expert_ids, weights, per_node, self._cross, "dispatch"
        )
        # Phase 2 (intra-node): slots hold node-local ids; a member holds per_member of them.
        x2, s2, w2, copy2, send2, recv2 = _route_copies(x1, s1, w1, per_member, self._intra, "dispatch")
        # The expert rank: one (row, slot) pair per used slot, grouped by local expert.
        used = s2 >= 0
        row, slot = used.nonzero(as_tuple=True)
        local = s2[row, slot].long()
        order = torch.argsort(local, stable=True)
        row, slot, local = row[order], slot[order], local[order]
        counts = torch.bincount(local, minlength=per_member).tolist()
        y = experts(x2.index_select(0, row), counts)
        # Weighted and summed per received row: one row per (copy, member) goes back.
        z2 = _weighted_sum(y, row, w2[row, slot], x2.shape[0])
        z1 = _weighted_sum(_all_to_all(z2, send2, recv2, self._intra, "combine"), copy2, None, x1.shape[0])
        # Pre-reduced in the node: one row per (token, node) crosses back.
        z0 = _all_to_all(z1, send1, recv1, self._cross, "combine")
        return _weighted_sum(z0, copy1, None, num_tokens)


class MoNTADispatcher:
    """TP-duplicate dropping with a chunked all-to-all / all-gather pipeline (MoNTA); see the module docstring.

    Group layout. TP is innermost in Megatron's order: TP peers are consecutive ranks (``[0,1] [2,3] ...``
    for t = 2), on one node. MoNTA's layout (seeds.md §1.2) forms each EP group from the ranks with the
    *same TP rank*, e.g. world 8, t = 2: EP groups ``[0,2,4,6]`` and ``[1,3,5,7]``, so the EP all-to-all
    crosses nodes and the TP all-gather stays inside one; Megatron's expert grid with ETP = 1 instead
    takes contiguous EP groups (``[0,1,2,3] [4,5,6,7]``). Both work: the only requirement is that each EP
    group holds all E experts and that the TP peers hold the same tokens.

    Gradients. Token and weight gradients come out whole and identical on every TP rank (the
    TP-replicated convention of DeepSpeed's ``drop_tokens``/``gather_tokens``: the gradient of a dropped
    slice is all-gathered, that of a gathered result is sliced, never summed). Expert gradients: each
    token of a TP group reaches an expert once, so the expert gradients summed over all replicas of an
    expert (the expert data-parallel all-reduce) equal the single-process gradient once per TP group,
    whereas duplicated dispatch (every TP rank sends every token) gives t times it: a run loop that
    divides expert gradients by TP to undo the duplication must not do so with this dispatcher.

    Parameters
    ----------
    ep_group, tp_group
        This rank's EP group and TP group (created by the caller on every rank).
    num_experts
        E, divisible by the EP size.
    num_chunks
        C, the pipeline depth of the combine (DeepSpeed's ``shard_num``, default 4 there as here).
    meter
        Counts bytes and time (kinds ``dispatch``, ``combine``, ``counts``, ``all_gather``, and
        ``drop_backward`` for the all-gather of the token and weight gradients).
    """

    def __init__(
        self,
        ep_group: dist.ProcessGroup,
        tp_group: dist.ProcessGroup,
        num_experts: int,
        num_chunks: int = 4,
        meter: TrafficMeter | None = None,
    ) -> None:
        if num_chunks < 1:
            raise ValueError(f"num_chunks ({num_chunks}) must be >= 1")
        self._ep = _Comm.of(ep_group, meter)
        self._tp = _Comm.of(tp_group, meter)
        self.num_experts = num_experts
        self.num_local_experts = _check_experts(num_experts, self._ep.size)
        self.num_chunks = num_chunks

    def __call__(self, tokens: Tensor, expert_ids: Tensor, weights: Tensor, experts: ExpertFn) -> Tensor:
        tp, ep, num_chunks = self._tp, self._ep, self.num_chunks
        slice_rows = _split_sizes(tokens.shape[0], tp.size)
        start, rows = sum(slice_rows[: tp.rank]), slice_rows[tp.rank]
        if tp.size > 1:
            tokens = cast(Tensor, _apply(_TPDrop, tokens, slice_rows, tp))
            weights = cast(Tensor, _apply(_TPDrop, weights, slice_rows, tp))
        expert_ids = expert_ids.narrow(0, start, rows)
        chunk_rows = [_split_sizes(n, num_chunks) for n in slice_rows]  # [TP rank][chunk]
        mine = chunk_rows[tp.rank]
        chunk_of_token = torch.repeat_interleave(
            torch.arange(num_chunks, device=tokens.device),
            torch.tensor(mine, device=tokens.device),
            output_size=rows,
        )
        plan = _flat_plan(expert_ids, None, chunk_of_token, num_chunks, self.num_local_experts, ep)
        x_recv = _all_to_all(
            tokens.index_select(0, plan.token_index), plan.recv_rows, plan.send_rows, ep, "dispatch"
        )
        y_recv = _run_experts(x_recv, plan, experts)
        w_sent = weights.reshape(-1).index_select(0, plan.pair_index)

        # Rows of one chunk are contiguous per member on both sides: received rows are ordered (source,
        # chunk, local expert) and sent rows (destination, chunk, local expert).
        def blocks(x: Tensor, counts: list[list[list[int]]], chunk: int) -> Tensor:
            offsets = [0]
            for member in counts:
                offsets.append(offsets[-1] + sum(sum(c) for c in member))
            parts = [
                x.narrow(0, offsets[m] + sum(sum(c) for c in counts[m][:chunk]), sum(counts[m][chunk]))
                for m in range(len(counts))
            ]
            return torch.cat(parts)

        # Issue every chunk's combine all-to-all first, then gather chunk c while c+1.. are in flight.
        backs = [
            _all_to_all_start(
                blocks(y_recv, plan.recv_counts, c),
                [sum(member[c]) for member in plan.send_counts],
                [sum(member[c]) for member in plan.recv_counts],
                ep,
                "combine",
            )
            for c in range(num_chunks)
        ]
        gathers: list[tuple[Tensor, ...]] = []
        gather_pending: list[_Pending] = []
        for c, (back, pending) in enumerate(backs):
            pending.wait()
            token = blocks(plan.token_index, plan.send_counts, c) - sum(mine[:c])
            out_c = _weighted_sum(back, token, blocks(w_sent, plan.send_counts, c), mine[c])
            if tp.size == 1:
                gathers.append((out_c,))
                continue
            gathers.append(
                cast(
                    tuple[Tensor, ...],
                    _apply(
                        _TPGather,
                        out_c,
                        [chunk_rows[q][c] for q in range(tp.size)],
                        tp,
                        "all_gather",
                        gather_pending,
                    ),
                )
            )
        for pending in gather_pending:
            pending.wait()
        for pending in [p for _, p in backs] + gather_pending:
            pending.flush()
        return torch.cat(
            [gathers[c][q][: chunk_rows[q][c]] for q in range(tp.size) for c in range(num_chunks)]
        )


class Condensing:
    """Luffy token condensation around any dispatcher: near-duplicate tokens of an expert are sent once.

    Among the pairs routed to one expert (in token order), a pair whose token has cosine similarity
    ``> threshold`` to an earlier *kept* token of that expert is condensed: it is not sent, and its
    output is the most similar representative's expert output times its own weight. The kept pairs go
    to ``inner`` as single-expert rows (K = 1, weight 1) so that each representative's unweighted output
    comes back on its own; the weighting happens here. Consequences: under
    :class:`HierarchicalDispatcher` the kept pairs of one token are no longer node-deduplicated, and an
    inner capacity factor applies to the kept rows. Gradients follow the condensed computation (a
    condensed token gets no gradient through its condensed pairs; its representative does).

    With ``threshold >= 1`` nothing can be condensed (cosine similarity is at most 1, clamped against
    rounding) and the call is exactly ``inner(...)``. Similarities are computed on this rank's tokens only
    (O(n^2) per expert, greedy on the host): meant for small models and traffic experiments.

    Attributes
    ----------
    num_pairs, num_condensed
        (token, expert) pairs in the last call, and how many of them were condensed.
    condensed_fraction
        ``num_condensed / num_pairs`` (0 before the first call).
    """

    def __init__(self, inner: TokenDispatcher, threshold: float) -> None:
        self.inner = inner
        self.threshold = threshold
        self.num_pairs = 0
        self.num_condensed = 0

    @property
    def condensed_fraction(self) -> float:
        return self.num_condensed / self.num_pairs if self.num_pairs else 0.0

    def __call__(self, tokens: Tensor, expert_ids: Tensor, weights: Tensor, experts: ExpertFn) -> Tensor:
        self.num_pairs = expert_ids.numel()
        if self.threshold >= 1.0:
            self.num_condensed = 0
            return self.inner(tokens, expert_ids, weights, experts)
        k = expert_ids.shape[1]
        representative = self._representatives(tokens.detach(), expert_ids)
        pairs = torch.arange(expert_ids.numel(), device=expert_ids.device)
        is_kept = representative == pairs
        kept = is_kept.nonzero().squeeze(1)
        self.num_condensed = self.num_pairs - kept.numel()
        slot_of_kept = torch.cumsum(is_kept.long(), 0) - 1
        y = self.inner(
            tokens.index_select(0, kept // k),
            expert_ids.reshape(-1)[kept].unsqueeze(1),
            torch.ones((kept.numel(), 1), dtype=weights.dtype, device=weights.device),
            experts,
        )
        rows = y.index_select(0, slot_of_kept[representative])
        return _weighted_sum(rows, pairs // k, weights.reshape(-1), tokens.shape[0])

    def _representatives(self, tokens: Tensor, expert_ids: Tensor) -> Tensor:
        """[T*K] the flat pair index whose expert output each pair uses (itself when kept)."""
        k = expert_ids.shape[1]
        flat = expert_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        unit = torch.nn.functional.normalize(tokens.float(), dim=-1).index_select(0, order // k)
        _, counts = torch.unique_consecutive(flat[order], return_counts=True)
        representative = torch.arange(flat.numel())
        order_host = order.tolist()
        start = 0
        for n in counts.tolist():
            block = unit[start : start + n]
            sims = (block @ block.t()).clamp(-1.0, 1.0).tolist()  # one host copy per expert
            kept: list[int] = []
            for i, row in enumerate(sims):
                best = max(kept, key=row.__getitem__, default=None)
                if best is not None and row[best] > self.threshold:
                    representative[order_host[start + i]] = order_host[start + best]
                else:
                    kept.append(i)
            start += n
        return representative.to(flat.device)
