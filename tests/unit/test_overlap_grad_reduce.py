"""The data-parallel overlap as a plan setting (issue 17 item 2, ``ParallelConfig.overlap_grad_reduce``):
priced (off, the gradient reduction and the parameter gather are exposed whole), emitted (Megatron's
``--overlap-grad-reduce`` and ``--overlap-param-gather`` only when on), refused where FSDP overlaps by itself
(rule 16), stated by validation files, and named by ``moeplan run``, whose runtime reduces after the backward."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from planner.catalog import load_cluster, load_model
from planner.costmodel import estimate
from planner.emit import load_plan, megatron_args, write_plan
from planner.feasibility import check_plan
from planner.schema import ParallelConfig, TrainingSpec
from planner.workflows.run_request import RunAsk, build_run_request
from tests.conftest import REPO
from tests.unit.stated_cases import unstated_and_stated
from tests.unit.test_emit import mixtral_plan

MODEL = load_model("mixtral-8x7b")
CLUSTER = load_cluster("dgx-h100", num_nodes=4)
TRAINING = TrainingSpec(seq_len=4096, global_batch=256)


def _terms(overlap: bool) -> tuple[dict[str, tuple[float, float]], float]:
    parallel = ParallelConfig.for_world(32, tp=2, ep=8, overlap_grad_reduce=overlap)
    result = estimate(MODEL, TRAINING, parallel, CLUSTER)
    return {t.name: (t.total_s, t.exposed_s) for t in result.breakdown}, result.step_time_s


def test_without_overlap_the_reduction_and_gather_are_exposed_whole() -> None:
    on, step_on = _terms(True)
    off, step_off = _terms(False)
    names = ("dp_grad_reduce", "dp_param_all_gather")
    assert all(off[n][0] == on[n][0] > 0 for n in names)  # the same collectives
    assert all(off[n][1] == off[n][0] for n in names)  # nothing hides them
    assert all(on[n][1] < on[n][0] for n in names)  # the backward and forward hide part or all
    hidden = sum(on[n][0] - on[n][1] for n in names)
    assert step_off == pytest.approx(step_on + hidden)


def test_megatron_flags_follow_the_setting() -> None:
    on = megatron_args(mixtral_plan(), MODEL)
    off = megatron_args(mixtral_plan(overlap_grad_reduce=False), MODEL)
    assert "--overlap-grad-reduce" in on and "--overlap-param-gather" in on
    assert "--overlap-grad-reduce" not in off and "--overlap-param-gather" not in off


def test_fsdp2_cannot_turn_it_off_and_megatron_fsdp_runs_each_layer_in_line() -> None:
    fsdp2 = ParallelConfig.for_world(32, tp=2, ep=8, overlap_grad_reduce=False, dp_sharding="fsdp2")
    assert "overlap_grad_reduce" in {v.field for v in check_plan(MODEL, TRAINING, fsdp2, 32)}
    for sharding in ({}, {"fsdp": True}):
        plain = ParallelConfig.for_world(32, tp=2, ep=8, overlap_grad_reduce=False, **sharding)
        assert not check_plan(MODEL, TRAINING, plain, 32), sharding
    terms = {
        overlap: {
            t.name: t
            for t in estimate(
                MODEL,
                TRAINING,
                ParallelConfig.for_world(32, tp=2, ep=8, fsdp=True, overlap_grad_reduce=overlap),
                CLUSTER,
            ).breakdown
        }["fsdp_gather_scatter"]
        for overlap in (True, False)
    }
    assert terms[False].exposed_s == terms[False].total_s == terms[True].total_s > terms[True].exposed_s


def test_a_validation_file_may_state_it(tmp_path: Path) -> None:
    def data_parallel(case: dict[str, Any]) -> bool:
        return (case["parallel"].get("pp") or 1) * (case["parallel"].get("tp") or 1) < case["num_gpus"]

    off = {"overlap_grad_reduce": False}
    unstated, stated = unstated_and_stated(tmp_path, "dense-h100.yaml", data_parallel, off)
    assert stated.estimate.step_time_s > unstated.estimate.step_time_s


def tiny_plan_file(folder: Path, parallel: ParallelConfig) -> Path:
    """The tiny MoE golden plan on 2 GPUs with ``parallel``, written to ``folder``: a plan ``moeplan run`` takes."""
    plan = load_plan(REPO / "examples" / "golden" / "tiny-moe-v100-pcie.plan.json")
    plan = plan.model_copy(
        update={
            "num_gpus": 2, "num_nodes": 1, "num_gpus_per_node": 2, "estimate": None, "parallel": parallel,
            "training": TrainingSpec(seq_len=32, global_batch=4),
        }
    )  # fmt: skip
    write_plan(folder / "plan.json", plan)
    return folder / "plan.json"


def test_run_names_the_overlap_it_does_not_run_and_prices_without_it(tmp_path: Path) -> None:
    path = tiny_plan_file(tmp_path, ParallelConfig.for_world(2, ep=2))
    request = build_run_request(RunAsk(plan_path=path))
    ignored = {entry.field: entry for entry in request.ignored}
    assert ignored["parallel.overlap_grad_reduce"].value is True
    assert ignored["parallel.overlap_grad_reduce"].runs is False
    assert request.options.parallel.overlap_grad_reduce is False
