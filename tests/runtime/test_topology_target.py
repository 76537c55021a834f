"""TA-MoE's per-rank target proportions in ``moeplan run`` (``planner/runtime/train.py``)."""

from __future__ import annotations

import time

import pytest

from planner.catalog import load_model
from planner.runtime.run_options import RunOptions, unsupported
from planner.runtime.train import _topology_target
from planner.schema import DispatcherSpec, ParallelConfig


def _options(share: float | None, ranks_per_node: int = 2) -> RunOptions:
    dispatcher = DispatcherSpec(topology_aware_routing=True)
    return RunOptions(
        model=load_model("tiny-moe"), model_name="tiny-moe", backend="gloo", steps=1, seq_len=32, global_batch=8,
        parallel=ParallelConfig.for_world(4, ep=4, dispatcher=dispatcher), ranks_per_node=ranks_per_node,
        started=time.time(), topology_remote_share=share,
    )  # fmt: skip


def test_target_keeps_the_own_share_and_splits_the_rest_by_node() -> None:
    # tiny-moe: 8 experts on 4 EP ranks, two per node. Rank 2 holds experts 4, 5; its node peer is rank 3.
    target = _topology_target(_options(0.2), [0, 1, 2, 3], 2)
    own, local, remote = 1 / 4, 3 / 4 * 0.8, 3 / 4 * 0.2
    expected = [remote / 4] * 4 + [own / 2] * 2 + [local / 2] * 2
    assert target.tolist() == pytest.approx(expected)
    assert float(target.sum()) == pytest.approx(1.0)


def test_one_node_or_one_rank_per_node_needs_no_split() -> None:
    assert _topology_target(_options(0.2, ranks_per_node=4), [0, 1, 2, 3], 0).tolist() == pytest.approx(
        [1 / 8] * 8
    )
    assert _topology_target(_options(0.2, ranks_per_node=1), [0, 1, 2, 3], 0).tolist() == pytest.approx(
        [1 / 8] * 8
    )


def test_the_share_is_required() -> None:
    reason = unsupported(_options(None))
    assert reason is not None and "topology_remote_share" in reason
