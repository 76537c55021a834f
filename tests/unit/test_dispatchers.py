"""The cost model's dispatcher registry: one module per kind, in step with the schema, no fallbacks."""

from __future__ import annotations

from typing import get_args

import pytest

from planner.catalog import load_model
from planner.costmodel.dispatchers import dispatcher, dispatcher_names, kinds, spec_for
from planner.errors import SpecError
from planner.schema import DispatcherKind, DispatcherName, DispatcherSpec, TrainingSpec
from planner.search.space import SearchOptions, candidate_layouts


def test_every_schema_kind_has_one_module_and_no_more() -> None:
    assert kinds() == tuple(sorted(get_args(DispatcherKind)))
    names = {name for part in get_args(DispatcherName) for name in get_args(part)}
    assert set(dispatcher_names()) == names


def test_an_unknown_kind_is_refused_with_the_known_ones() -> None:
    with pytest.raises(SpecError, match=r"'ring' is unknown.*alltoall, hierarchical"):
        dispatcher("ring")


def test_a_kernel_library_names_its_kind() -> None:
    assert (spec_for("deepep").kind, spec_for("deepep").backend) == ("hierarchical", "deepep")
    assert (spec_for("monta").kind, spec_for("monta").backend) == ("monta", None)


def test_sms_held_come_from_the_kind_not_a_default() -> None:
    # Megatron-Core 0.16's defaults: DeepEP 20 (DeepSeek-V3 §3.2.2), Hybrid-EP 16; a hierarchical spec without
    # a backend is Megatron's default backend, DeepEP (it used to fall back to NCCL's 16).
    hierarchical = dispatcher("hierarchical")
    assert (
        hierarchical.comm_sms(DispatcherSpec(kind="hierarchical", backend="deepep")),
        hierarchical.comm_sms(DispatcherSpec(kind="hierarchical", backend="hybridep")),
        hierarchical.comm_sms(DispatcherSpec(kind="hierarchical")),
        hierarchical.comm_sms(DispatcherSpec(kind="hierarchical", backend="hybridep", num_sms=24)),
    ) == (20, 16, 20, 24)
    assert dispatcher("alltoall").comm_sms(DispatcherSpec()) == 16


@pytest.mark.parametrize(("asked", "backends"), [(("deepep",), {"deepep"}), (("hybridep",), {"hybridep"}),
                                                   (("hierarchical",), {"deepep", "hybridep"})])  # fmt: skip
def test_the_search_tries_only_the_libraries_asked_for(asked: tuple[str, ...], backends: set[str]) -> None:
    model = load_model("mixtral-8x7b")
    layouts = candidate_layouts(model, TrainingSpec(global_batch=64), 16, 8, SearchOptions(dispatchers=asked))
    found = {(p.dispatcher.kind, p.dispatcher.backend) for p in layouts if p.ep > 1}
    assert found == {("hierarchical", b) for b in backends}
