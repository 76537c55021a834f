"""Collectives with autograd, and their metering: what every dispatcher kind communicates with.

Each collective is a ``torch.autograd.Function`` whose backward is the transposed collective, so gradients
reach the tokens, the combine weights and the expert parameters exactly as the one-process
:class:`~planner.runtime.dispatchers._local.LocalDispatcher` gives them. They run on gloo (CPU) and NCCL
(GPU) alike: only ``all_to_all_single`` with uneven splits and list-form ``all_gather``; the split sizes
are copied to the host once per exchange (gloo and NCCL both take them as Python ints), never per token.

Why not ``torch.distributed.nn.functional``: in torch 2.13 its ``all_to_all_single`` and ``all_gather``
raise ``FutureWarning`` on every call (pointing at ``_functional_collectives``, whose autograd variants
are private), and none of them can be issued asynchronously; MoNTA needs that. The Functions below are
a few lines each.

Metering. Every collective counts the bytes this rank sends to each member under a :class:`TrafficMeter`
kind chosen by the caller; the backward's collectives count as ``"<kind>_backward"``. A rank sends back
(gradients of) what it received, so for the all-to-alls its ``dispatch_backward`` bytes are its
``combine`` bytes and vice versa (integer metadata has no gradient).
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

from planner.runtime.meter import TrafficMeter

__all__ = [
    "DONE", "Comm", "Pending", "all_gather_rows", "all_to_all", "all_to_all_ints", "all_to_all_start",
    "exchange_counts", "gather_rows", "issue", "reduce_scatter_rows", "tp_drop", "tp_gather_start",
]  # fmt: skip


@dataclass(frozen=True)
class Comm:
    """A process group with the global ranks of its members (in group-rank order) and the meter."""

    group: dist.ProcessGroup
    ranks: tuple[int, ...]
    rank: int
    """This process's index in ``ranks``."""
    meter: TrafficMeter | None

    @classmethod
    def of(cls, group: dist.ProcessGroup, meter: TrafficMeter | None) -> Comm:
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


class Pending:
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


DONE = Pending(None, None, "")
"""A collective that has already completed (or never needed to run)."""


def _row_bytes(x: Tensor) -> int:
    return math.prod(x.shape[1:]) * x.element_size()


def issue(
    comm: Comm,
    kind: str,
    send_bytes: Sequence[int],
    like: Tensor,
    async_op: bool,
    launch: Callable[[], Any],
) -> Pending:
    """Count ``send_bytes[i]`` bytes to member i, launch the collective and time it (``like``: its device)."""
    meter = comm.meter
    if meter is None:
        work = launch()
        return Pending(work, None, kind) if async_op else DONE
    meter.add_bytes(kind, comm.ranks, send_bytes)
    if not async_op:
        with meter.timed(kind, _synchronizer(like)):
            launch()
        return DONE
    if like.is_cuda:
        start = _recorded_event()
        return Pending(launch(), meter, kind, start_event=start)
    started = meter.start()
    return Pending(launch(), meter, kind, started=started)


def _all_to_all_raw(
    x: Tensor, out_rows: list[int], in_rows: list[int], comm: Comm, kind: str, async_op: bool
) -> tuple[Tensor, Pending]:
    out = x.new_empty((sum(out_rows), *x.shape[1:]))
    x = x.contiguous()
    row = _row_bytes(x)
    pending = issue(comm, kind, [n * row for n in in_rows], x, async_op, lambda: dist.all_to_all_single(
        out, x, output_split_sizes=out_rows, input_split_sizes=in_rows, group=comm.group, async_op=async_op
    ))  # fmt: skip
    return out, pending


class _AllToAll(torch.autograd.Function):
    """Uneven ``all_to_all_single``; the backward is the transposed (splits swapped) all-to-all."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        out_rows: list[int],
        in_rows: list[int],
        comm: Comm,
        kind: str,
        pending: list[Pending] | None,
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


def all_to_all(x: Tensor, out_rows: list[int], in_rows: list[int], comm: Comm, kind: str) -> Tensor:
    """Row i-block of ``x`` (``in_rows[i]`` rows) goes to member i; returns the received blocks in order."""
    if comm.size == 1:
        return x
    return cast(Tensor, _apply(_AllToAll, x, out_rows, in_rows, comm, kind, None))


def all_to_all_start(
    x: Tensor, out_rows: list[int], in_rows: list[int], comm: Comm, kind: str
) -> tuple[Tensor, Pending]:
    """As :func:`all_to_all`, issued asynchronously: the result is valid after ``pending.wait()``."""
    if comm.size == 1:
        return x, DONE
    pending: list[Pending] = []
    out = cast(Tensor, _apply(_AllToAll, x, out_rows, in_rows, comm, kind, pending))
    return out, pending[0]


def exchange_counts(counts: Tensor, comm: Comm) -> Tensor:
    """Equal-split all-to-all of ``counts`` [P, ...]: entry i goes to member i (no autograd: integers)."""
    if comm.size == 1:
        return counts
    counts = counts.contiguous()
    out = torch.empty_like(counts)
    issue(
        comm,
        "counts",
        [_row_bytes(counts)] * comm.size,
        counts,
        False,
        lambda: dist.all_to_all_single(out, counts, group=comm.group),
    )
    return out


def all_to_all_ints(x: Tensor, out_rows: list[int], in_rows: list[int], comm: Comm, kind: str) -> Tensor:
    """Uneven all-to-all of integer metadata (no autograd)."""
    if comm.size == 1:
        return x
    out, _ = _all_to_all_raw(x, out_rows, in_rows, comm, kind, async_op=False)
    return out


def gather_rows(
    x: Tensor, rows: list[int], comm: Comm, kind: str, async_op: bool
) -> tuple[list[Tensor], Pending]:
    """All-gather of ``x`` (``rows[comm.rank]`` rows) over ``comm``; every result is padded to ``max(rows)``
    rows (the list form of ``all_gather`` needs equal shapes), of which the first ``rows[i]`` are valid."""
    pad = max(rows) - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    x = x.contiguous()
    outs = [torch.empty_like(x) for _ in range(comm.size)]
    pending = issue(
        comm,
        kind,
        [x.numel() * x.element_size()] * comm.size,  # the whole (padded) tensor to every peer
        x,
        async_op,
        lambda: dist.all_gather(outs, x, group=comm.group, async_op=async_op),
    )
    return outs, pending


# ---------------------------------------------------------------------------------------------------
# All-gather and reduce-scatter of row blocks (the all-gather dispatcher)


def _gathered(x: Tensor, rows: list[int], comm: Comm, kind: str) -> Tensor:
    """Every member's rows in member order, ``sum(rows)`` of them (the padding dropped)."""
    parts, _ = gather_rows(x, rows, comm, kind, async_op=False)
    return torch.cat([part[:n] for part, n in zip(parts, rows, strict=True)])


def _reduce_scattered(x: Tensor, rows: list[int], comm: Comm, kind: str) -> Tensor:
    """Member i's block of ``x`` (``rows[i]`` rows, in member order) summed over all members, to member i.

    gloo has no reduce-scatter: an uneven all-to-all of the blocks, then the sum over the P received
    copies of this rank's block, in member order (the way ``expert_tensor_parallel.py`` does it too).
    """
    mine = rows[comm.rank]
    received, _ = _all_to_all_raw(x, [mine] * comm.size, rows, comm, kind, async_op=False)
    return received.view(comm.size, mine, *x.shape[1:]).sum(0)


class _AllGatherRows(torch.autograd.Function):
    """All-gather of uneven row blocks; the backward is the reduce-scatter of the gradients.

    Every member uses the gathered rows for its own part of the loss (its experts), so the gradient of
    this rank's rows is the sum of every member's gradient for them."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, rows: list[int], comm: Comm, kind: str) -> Tensor:
        ctx.rows, ctx.comm, ctx.kind = rows, comm, kind
        return _gathered(x, rows, comm, kind)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return _reduce_scattered(grad, ctx.rows, ctx.comm, f"{ctx.kind}_backward"), None, None, None


class _ReduceScatterRows(torch.autograd.Function):
    """Reduce-scatter of uneven row blocks; the backward is the all-gather of the gradients."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, rows: list[int], comm: Comm, kind: str) -> Tensor:
        ctx.rows, ctx.comm, ctx.kind = rows, comm, kind
        return _reduce_scattered(x, rows, comm, kind)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return _gathered(grad, ctx.rows, ctx.comm, f"{ctx.kind}_backward"), None, None, None


def all_gather_rows(x: Tensor, rows: list[int], comm: Comm, kind: str) -> Tensor:
    """Member i's ``rows[i]`` rows of ``x``, concatenated in member order (autograd: the backward is the
    reduce-scatter of the gradients). ``x`` of integer dtype has no gradient: plain gathered metadata."""
    if comm.size == 1:
        return x
    if not x.is_floating_point():
        return _gathered(x, rows, comm, kind)
    return cast(Tensor, _apply(_AllGatherRows, x, rows, comm, kind))


def reduce_scatter_rows(x: Tensor, rows: list[int], comm: Comm, kind: str) -> Tensor:
    """``x`` holds ``rows[i]`` rows per member i in member order; returns this rank's block summed over
    the members (autograd: the backward is the all-gather of the gradients)."""
    if comm.size == 1:
        return x
    return cast(Tensor, _apply(_ReduceScatterRows, x, rows, comm, kind))


# ---------------------------------------------------------------------------------------------------
# TP-replicated rows (MoNTA)


class _TPGather(torch.autograd.Function):
    """All-gather of TP-sliced rows into TP-replicated rows (MoNTA's ``gather_tokens``).

    The result is *replicated*: every TP rank computes the same loss from it, and the gradient each TP
    rank holds for it is the full gradient. The gradient of this rank's slice is therefore its own rows
    of that gradient, not a sum over the TP group (DeepSpeed ``deepspeed/moe/mappings.py``:
    ``_GatherTokens.backward`` is ``drop_tokens``).
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, rows: list[int], comm: Comm, kind: str, pending: list[Pending]
    ) -> tuple[Tensor, ...]:
        ctx.rank, ctx.rows = comm.rank, x.shape[0]
        # Padded buffers, not views of them: the collective still writes into them after we return.
        outs, work = gather_rows(x, rows, comm, kind, async_op=True)
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
    def forward(ctx: Any, x: Tensor, rows: list[int], comm: Comm) -> Tensor:
        ctx.rows, ctx.comm = rows, comm
        start = sum(rows[: comm.rank])
        # A copy, not a view: the caller may index it freely and autograd owns a fresh tensor.
        return x.narrow(0, start, rows[comm.rank]).clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        parts, _ = gather_rows(grad, ctx.rows, ctx.comm, "drop_backward", async_op=False)
        return torch.cat([part[:n] for part, n in zip(parts, ctx.rows, strict=True)]), None, None


def tp_drop(x: Tensor, rows: list[int], comm: Comm) -> Tensor:
    """This TP rank's ``rows[comm.rank]`` rows of TP-replicated ``x`` (backward: ``drop_backward``)."""
    return cast(Tensor, _apply(_TPDrop, x, rows, comm))


def tp_gather_start(
    x: Tensor, rows: list[int], comm: Comm, kind: str, pending: list[Pending]
) -> tuple[Tensor, ...]:
    """Issue the all-gather of TP-sliced rows (member i: ``rows[i]``) into TP-replicated ones; appends its
    :class:`Pending` to ``pending``. Member i's result is padded: its first ``rows[i]`` rows are valid."""
    return cast(tuple[Tensor, ...], _apply(_TPGather, x, rows, comm, kind, pending))
