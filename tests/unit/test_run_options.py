"""The layouts the bundled runtime refuses before any rank starts, and why (torch-free)."""

from __future__ import annotations

import re
import time

import pytest

from planner.catalog import load_model
from planner.runtime.run_options import RunOptions, unsupported
from planner.schema import ParallelConfig


def _options(world: int, global_batch: int = 8, **degrees: object) -> RunOptions:
    parallel = ParallelConfig.for_world(world, **degrees)
    return RunOptions(
        model=load_model("tiny-moe"), model_name="tiny-moe", parallel=parallel, backend="gloo", steps=1,
        seq_len=32, global_batch=global_batch, ranks_per_node=world, started=time.time(),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("world", "global_batch", "degrees", "message"),
    [
        (2, 1, {"pp": 2}, r"pp \(2\) needs at least as many micro-batches.*gives 1"),
        (2, 6, {"pp": 2, "vpp": 2}, None),  # 6 micro-batches, a multiple of pp
        (4, 3, {"pp": 4}, r"pp \(4\) needs at least as many micro-batches.*gives 3"),
        (4, 4, {"pp": 4}, None),
        (2, 3, {"pp": 2, "vpp": 2}, r"multiple of pp \(2\), as Megatron requires"),
        (2, 8, {"pp": 2, "vpp": 4}, r"pp x vpp = 8 must divide the model's 4 layers"),
        (2, 8, {"pp": 2, "vpp": 2, "layers_per_stage": (1, 1, 1, 2)}, r"entries summing to the model's 4"),
        (2, 8, {"pp": 2, "vpp": 2, "layers_per_stage": (2, 0, 1, 1)}, None),
        (1, 8, {"vpp": 2}, r"vpp \(2\) needs pipeline parallelism"),
        (2, 8, {"cp": 2}, None),
        (4, 8, {"cp": 2, "tp": 2, "sequence_parallel": True}, None),
        (2, 8, {"etp": 2}, None),
        (2, 8, {"etp": 3}, r"etp x ep x edp x pp|etp \(3\) must divide"),
        # The monta dispatcher's own rule (planner.runtime.dispatchers.monta.refuse), not this one's.
        (2, 8, {"etp": 2, "tp": 2, "dispatcher": {"kind": "monta"}}, None),
        (4, 8, {"ep": 4, "dispatcher": {"sequence_migration": True}}, None),
        (4, 8, {"ep": 2, "tp": 2, "dispatcher": {"sequence_migration": True}}, r"tp 2 splits them"),
        (4, 8, {"ep": 2, "cp": 2, "dispatcher": {"sequence_migration": True}}, r"cp 2 splits them"),
        (2, 8, {"dispatcher": {"sequence_migration": True}}, r"needs ep > 1"),
        (
            4,
            8,
            {"ep": 4, "dispatcher": {"kind": "hierarchical", "sequence_migration": True}},
            r"alltoall dispatcher in the bundled runtime, not 'hierarchical'",
        ),
    ],
)
def test_pipeline_layouts_the_runtime_refuses(
    world: int, global_batch: int, degrees: dict[str, object], message: str | None
) -> None:
    reason = unsupported(_options(world, global_batch, **degrees))
    if message is None:
        assert reason is None
    else:
        assert reason is not None
        assert re.search(message, reason), reason


@pytest.mark.parametrize(
    ("seq_len", "degrees", "message"),
    [
        (36, {"cp": 2}, None),
        (34, {"cp": 2}, r"seq_len \(34\) must be a multiple of 2 x cp = 4"),
        (33, {}, None),  # no context parallelism: any length
        (36, {"cp": 2, "tp": 4, "sequence_parallel": True}, r"sequence length per CP rank \(18\)"),
    ],
)
def test_context_parallel_sequence_rules(
    seq_len: int, degrees: dict[str, object], message: str | None
) -> None:
    options = _options(8, **degrees).model_copy(update={"seq_len": seq_len})
    reason = unsupported(options)
    if message is None:
        assert reason is None
    else:
        assert reason is not None and re.search(message, reason), reason
