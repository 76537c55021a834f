"""The bundled runtime's expert-parallel token dispatchers: one module per kind, found from a registry.

A dispatcher moves (token, expert) pairs to the experts' ranks and back; every one implements
:class:`~planner.runtime.protocols.TokenDispatcher`::

    out[t] = sum_j weights[t, j] * expert[expert_ids[t, j]](tokens[t])

with autograd-correct communication (``_collectives.py``), so gradients reach the tokens, the combine
weights and the expert parameters exactly as the one-process ``LocalDispatcher`` (``_local.py``, the
reference every kind must match) gives them.

Kinds. Each public module of this package is one dispatcher kind, named as the schema names it
(``DispatcherSpec.kind``; ``planner/costmodel/dispatchers/`` prices the same kinds, and a test keeps
the two and the schema in step). A kind module exposes:

- ``refuse(parallel: ParallelConfig) -> str | None``: why the bundled runtime cannot run this kind with
  this layout, or None when it can. Checked before any rank starts and again on every rank.
- ``SENDS_TP_DUPLICATES: bool``: whether, with TP and no sequence parallelism, every TP rank's copy of a
  token reaches the experts (then each back-propagates its rank's loss: the run divides expert
  gradients by TP) or the kind sends each token of a TP group once (MoNTA).
- ``factory(setup: DispatcherSetup) -> Callable[[int], TokenDispatcher]``: called once per run on every
  rank, in the same order (it may create process groups collectively); returns the builder of each MoE
  layer's dispatcher (its argument is the layer's block index). With an EP group of one a kind may
  return the local dispatcher's builder.

Adding a kind on this side means adding its module (and its tests), nothing else. The registry
discovers the modules without importing them and imports a kind's module (and so torch) only when asked
about that kind: this package imports without torch. A kind without a module is refused with the
implemented kinds named, never replaced by another.

Private modules: ``_collectives`` (autograd collectives and their metering), ``_routing`` (capacity,
permutations, the flat all-to-all's plan), ``_local`` (``LocalDispatcher``), ``_condensing`` (Luffy's
condensation around any kind), ``_setup`` (``DispatcherSetup``).

Placement. An EP group of P members holds E experts, ``L = E / P`` per member: expert ``e`` is local
expert ``e % L`` of member ``e // L``. Ranks are node-contiguous, ``node_of(r) = r // ranks_per_node``.

Legend of the byte formulas in the kind modules: T tokens, H hidden, K top-k, L local experts per member,
P EP members, N nodes spanned by the EP group, G EP members per node, t TP size, C chunks, b bytes per
token element, b_w per weight. Each kind module states the bytes one rank sends per forward call, by
:class:`~planner.runtime.meter.TrafficMeter` kind; the backward runs the transposed collectives, counted
as ``"<kind>_backward"``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Protocol, cast

from planner.runtime.dispatchers._setup import DispatcherSetup
from planner.schema import ParallelConfig

if TYPE_CHECKING:
    from planner.runtime.protocols import TokenDispatcher

__all__ = [
    "DispatcherSetup",
    "KindModule",
    "dispatcher_factory",
    "implemented_kinds",
    "refusal",
    "sends_tp_duplicates",
]


class KindModule(Protocol):
    """What a kind module provides (see the package docstring)."""

    SENDS_TP_DUPLICATES: bool

    def refuse(self, parallel: ParallelConfig) -> str | None: ...

    def factory(self, setup: DispatcherSetup) -> Callable[[int], TokenDispatcher]: ...


@cache
def implemented_kinds() -> tuple[str, ...]:
    """The dispatcher kinds the bundled runtime implements (its public modules), sorted."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


def _not_implemented(kind: str) -> str:
    return (
        f"the bundled runtime does not implement the '{kind}' dispatcher (implemented: "
        f"{', '.join(implemented_kinds())}); it runs no other in its place: choose one of those"
    )


def _kind_module(kind: str) -> KindModule | None:
    if kind not in implemented_kinds():
        return None
    return cast(KindModule, importlib.import_module(f"{__name__}.{kind}"))


def refusal(parallel: ParallelConfig) -> str | None:
    """Why the bundled runtime cannot run this layout's dispatcher (None when it can); imports the kind's
    module, and with it torch."""
    kind = parallel.dispatcher.kind
    module = _kind_module(kind)
    if module is None:
        return _not_implemented(kind)
    return module.refuse(parallel)


def sends_tp_duplicates(parallel: ParallelConfig) -> bool:
    """Whether the layout's dispatcher lets every TP rank's copy of a duplicated token reach the experts."""
    module = _kind_module(parallel.dispatcher.kind)
    if module is None:
        raise ValueError(_not_implemented(parallel.dispatcher.kind))
    return module.SENDS_TP_DUPLICATES


def dispatcher_factory(setup: DispatcherSetup) -> Callable[[int], TokenDispatcher]:
    """The per-layer dispatcher builder of the layout's kind (call once per run, on every rank: it may
    create process groups); ValueError for a kind that is not implemented or refuses the layout."""
    kind = setup.parallel.dispatcher.kind
    module = _kind_module(kind)
    if module is None:
        raise ValueError(_not_implemented(kind))
    reason = module.refuse(setup.parallel)
    if reason:
        raise ValueError(reason)
    return module.factory(setup)
