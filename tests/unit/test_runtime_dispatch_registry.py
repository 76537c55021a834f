"""The runtime's dispatcher registry: one module per schema kind, torch-free to import, no substitutes."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import time
from typing import get_args

import pytest

from planner.catalog import load_model
from planner.errors import SpecError
from planner.execution.launcher import local_placement
from planner.runtime.dispatchers import DispatcherSetup, dispatcher_factory, implemented_kinds, refusal
from planner.runtime.meter import TrafficMeter
from planner.runtime.run_options import RunOptions, unsupported
from planner.schema import DispatcherKind, DispatcherSpec, ParallelConfig
from planner.workflows.run import launch_run


def _fake_kind(kind: str) -> ParallelConfig:
    """A layout whose dispatcher kind the schema does not know (built without validation)."""
    spec = DispatcherSpec.model_construct(**{**DispatcherSpec().model_dump(), "kind": kind})
    return ParallelConfig().model_copy(update={"dispatcher": spec})


def test_every_schema_kind_has_one_runtime_module_and_no_more() -> None:
    assert implemented_kinds() == tuple(sorted(get_args(DispatcherKind)))


def test_every_kind_module_has_the_interface() -> None:
    for kind in implemented_kinds():
        module = importlib.import_module(f"planner.runtime.dispatchers.{kind}")
        assert callable(module.refuse) and callable(module.factory), kind
        assert module.refuse(ParallelConfig(dispatcher=DispatcherSpec(kind=kind))) is None, kind


def test_importing_the_registry_does_not_import_torch() -> None:
    code = (
        "import sys, planner.runtime.dispatchers as d\n"
        "assert d.implemented_kinds()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _one_rank_setup(parallel: ParallelConfig) -> DispatcherSetup:
    return DispatcherSetup(
        parallel=parallel,
        num_experts=8,
        ranks_per_node=1,
        groups={},
        ep_groups=[[0]],
        meter=TrafficMeter(0, 1),
    )


def test_an_unimplemented_kind_is_refused_never_replaced() -> None:
    parallel = _fake_kind("ring")
    reason = refusal(parallel)
    assert reason is not None
    assert "'ring'" in reason and "allgather, alltoall, hierarchical, monta" in reason
    setup = _one_rank_setup(parallel)
    with pytest.raises(ValueError, match=re.escape(reason)):
        dispatcher_factory(setup)


def test_a_kind_that_refuses_the_layout_builds_nothing() -> None:
    parallel = ParallelConfig(tp=2, etp=2, dispatcher=DispatcherSpec(kind="monta"))
    setup = _one_rank_setup(parallel)
    with pytest.raises(ValueError, match="monta dispatcher with etp > 1"):
        dispatcher_factory(setup)


@pytest.mark.parametrize(
    ("degrees", "message"),
    [
        ({"tp": 2, "etp": 2, "dispatcher": {"kind": "monta"}}, r"monta dispatcher with etp > 1"),
        (
            {"tp": 2, "sequence_parallel": True, "dispatcher": {"kind": "monta"}},
            r"sequence parallelism leaves none: run monta with --no-sequence-parallel",
        ),
        ({"tp": 2, "sequence_parallel": False, "dispatcher": {"kind": "monta"}}, None),
        ({"ep": 2, "etp": 2, "dispatcher": {"kind": "allgather"}}, r"allgather dispatcher with etp > 1"),
        ({"ep": 4, "dispatcher": {"kind": "allgather"}}, None),
        ({"tp": 2, "ep": 2, "sequence_parallel": True, "dispatcher": {"kind": "allgather"}}, None),
        ({"ep": 2, "etp": 2, "dispatcher": {"kind": "hierarchical"}}, None),
        ({"ep": 2, "etp": 2, "dispatcher": {"kind": "alltoall"}}, None),
    ],
)
def test_what_each_kind_refuses(degrees: dict[str, object], message: str | None) -> None:
    reason = refusal(ParallelConfig.model_validate(degrees))
    if message is None:
        assert reason is None
    else:
        assert reason is not None and re.search(message, reason), reason


def test_the_launcher_refuses_before_any_rank_starts() -> None:
    # launch_run applies both rules: the layout's (torch-free) and the dispatcher kind's.
    options = RunOptions(
        model=load_model("tiny-moe"), model_name="tiny-moe", parallel=_fake_kind("ring").model_copy(update={"ep": 1}),
        backend="gloo", steps=1, seq_len=32, global_batch=8, ranks_per_node=1, started=time.time(),
    )  # fmt: skip
    assert unsupported(options) is None
    with pytest.raises(SpecError, match="does not implement the 'ring' dispatcher"):
        launch_run(options, local_placement(1))
