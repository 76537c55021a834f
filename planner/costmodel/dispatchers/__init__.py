"""The token dispatchers of the cost model: one module per kind, found from this registry.

Each public module of this package is one dispatcher kind, named as the schema names it
(``DispatcherSpec.kind``), holding a ``DISPATCHER`` (``_base.Dispatcher``: traffic formula, time, kernel
count, SMs held, buffers, rules, search variants, launch-format names). The registry discovers the
modules, so a kind is added here by adding its module; the bundled runtime has the same shape on its
side (``planner/runtime/dispatchers/``). An unknown kind is refused with the known ones named, never
replaced by another.

Names users type (``--dispatcher``, the validation format) are the kinds and, for a kind with kernel
libraries, each library's name (``deepep``, ``hybridep``): ``spec_for`` turns one into a spec.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from planner.costmodel.dispatchers._base import (
    UNFUSED_ROUTER_KERNELS,
    DispatchCopies,
    Dispatcher,
    RoutingShape,
)
from planner.errors import SpecError
from planner.schema import DispatcherSpec

__all__ = [
    "UNFUSED_ROUTER_KERNELS",
    "DispatchCopies",
    "Dispatcher",
    "RoutingShape",
    "dispatch_copies",
    "dispatcher",
    "dispatcher_names",
    "kinds",
    "spec_for",
]


@cache
def _registry() -> dict[str, Dispatcher]:
    found: dict[str, Dispatcher] = {}
    for module in pkgutil.iter_modules(__path__):
        if module.name.startswith("_"):
            continue
        found_dispatcher = importlib.import_module(f"{__name__}.{module.name}").DISPATCHER
        assert isinstance(found_dispatcher, Dispatcher) and found_dispatcher.kind == module.name, module.name
        found[module.name] = found_dispatcher
    return dict(sorted(found.items()))


def kinds() -> tuple[str, ...]:
    """Every dispatcher kind the cost model prices, sorted."""
    return tuple(_registry())


def dispatcher(kind: str) -> Dispatcher:
    """The cost model's dispatcher of ``kind``; SpecError naming the known kinds for any other."""
    found = _registry().get(kind)
    if found is None:
        raise SpecError(
            f"dispatcher kind '{kind}' is unknown to the cost model; known: {', '.join(kinds())}."
        )
    return found


def dispatcher_names() -> tuple[str, ...]:
    """What ``--dispatcher`` accepts: every kind, and every kernel library of a kind that has several."""
    return tuple(sorted({*kinds(), *(b for d in _registry().values() for b in d.backends)}))


def spec_for(name: str, **options: object) -> DispatcherSpec:
    """The spec a dispatcher name means: a kind, or a kernel library (``deepep``) as its kind's backend."""
    for found in _registry().values():
        if name in found.backends:
            return DispatcherSpec.model_validate({"kind": found.kind, "backend": name, **options})
    return DispatcherSpec.model_validate({"kind": dispatcher(name).kind, **options})


def dispatch_copies(kind: str, **shape: object) -> DispatchCopies:
    """Copies per source token of one dispatch of ``kind`` (``shape``: the fields of ``RoutingShape``)."""
    return dispatcher(kind).copies(RoutingShape(**shape))  # type: ignore[arg-type]
