"""The SMs of DeepEP and Hybrid-EP as a plan setting (issue 17 item 2, ``DispatcherSpec.num_sms``): priced
(below the count that saturates the links the tokens move proportionally slower; above it nothing is gained
and overlapped compute loses more), emitted with the flag of each Megatron-Core release so the launch holds
the SMs priced, refused where it cannot be stated, and stated by validation files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from planner.accuracy.validate import validate_suite
from planner.accuracy.validation_file import load_validation_file
from planner.catalog import load_cluster, load_gpu, load_model
from planner.costmodel import estimate
from planner.emit import megatron_args
from planner.errors import SpecError
from planner.feasibility import check_plan
from planner.frameworks import framework
from planner.schema import DispatcherSpec, ParallelConfig, TrainingSpec
from tests.unit.stated_cases import unstated_and_stated, write_pair
from tests.unit.test_emit import make_plan

MODEL = load_model("mixtral-8x7b")
CLUSTER = load_cluster("dgx-h100", num_nodes=4)
TRAINING = TrainingSpec(seq_len=4096, global_batch=256)


def _ep_terms(backend: str, num_sms: int | None, overlap: bool = False) -> dict[str, float]:
    spec = DispatcherSpec(kind="hierarchical", backend=backend, num_sms=num_sms)
    parallel = ParallelConfig.for_world(32, ep=8, dispatcher=spec, a2a_overlap=overlap)
    return {t.name: t.total_s for t in estimate(MODEL, TRAINING, parallel, CLUSTER).breakdown}


@pytest.mark.parametrize(("backend", "default"), [("deepep", 20), ("hybridep", 16)])
def test_fewer_sms_move_tokens_slower_and_more_gain_nothing(backend: str, default: int) -> None:
    base = _ep_terms(backend, None)["ep_dispatch_combine"]
    assert _ep_terms(backend, default)["ep_dispatch_combine"] == base  # None is Megatron-Core 0.16's default
    assert _ep_terms(backend, default // 2)["ep_dispatch_combine"] == pytest.approx(2 * base)
    assert _ep_terms(backend, 2 * default)["ep_dispatch_combine"] == base
    held = {
        sms: _ep_terms(backend, sms, overlap=True)["ep_overlap_sm_cost"] for sms in (default, 2 * default)
    }
    assert held[2 * default] > held[default] > 0


def test_megatron_states_the_sms_of_each_release() -> None:
    model = load_model("mixtral-8x7b")

    def sms_flags(spec: DispatcherSpec, version: str) -> list[str]:
        plan = make_plan("mixtral-8x7b", 16, ep=8, dispatcher=spec, moe_router_fusion=False)
        args = megatron_args(plan, model, version)
        return [f"{a} {b}" for a, b in zip(args, args[1:], strict=False) if a.endswith("-num-sms")]

    deepep, hybridep = (DispatcherSpec(kind="hierarchical", backend=b) for b in ("deepep", "hybridep"))
    assert sms_flags(deepep, "0.12") == []  # DeepEP's own default, 20: the count priced
    assert sms_flags(deepep, "0.13") == ["--moe-deepep-num-sms 20"]
    assert sms_flags(hybridep, "0.16") == ["--moe-hybridep-num-sms 16"]
    assert sms_flags(hybridep.model_copy(update={"num_sms": 24}), "0.19") == [
        "--moe-flex-dispatcher-num-sms 24"
    ]
    with pytest.raises(SpecError, match=r"dispatcher.num_sms \(24\) needs megatron_version 0.13"):
        sms_flags(deepep.model_copy(update={"num_sms": 24}), "0.12")


def test_where_it_cannot_be_stated() -> None:
    with pytest.raises(ValidationError, match="num_sms"):
        DispatcherSpec(kind="alltoall", num_sms=20)
    spec = DispatcherSpec(kind="hierarchical", backend="deepep", num_sms=132)
    parallel = ParallelConfig.for_world(32, ep=8, dispatcher=spec)
    broken = check_plan(MODEL, TRAINING, parallel, 32, load_gpu("H100-SXM"))
    assert any("must leave SMs for compute" in v.rule for v in broken)
    titan = parallel.model_copy(
        update={
            "dispatcher": spec.model_copy(update={"num_sms": 24}),
            "dp_sharding": "fsdp2",
            "moe_router_fusion": False,
        }
    )
    assert "dispatcher.num_sms" in {v.field for v in framework("torchtitan").rules(MODEL, TRAINING, titan)}


def test_a_validation_file_may_state_it(tmp_path: Path) -> None:
    def hybridep_exposed(case: dict[str, Any]) -> bool:  # its EP time shows
        return case["parallel"].get("dispatcher") == "hybridep" and not case["parallel"].get("a2a_overlap")

    half = {"dispatcher_num_sms": 8}
    unstated, stated = unstated_and_stated(tmp_path, "locked-moe.yaml", hybridep_exposed, half)
    assert stated.estimate.step_time_s > unstated.estimate.step_time_s
    path = write_pair(tmp_path, "locked-moe.yaml", hybridep_exposed, half | {"dispatcher": "alltoall"})
    with pytest.raises(SpecError, match="dispatcher_num_sms"):
        validate_suite(load_validation_file(path))


@pytest.mark.parametrize("precision", ["fp8", "mxfp8"])
def test_fp8_training_dispatches_bf16_rows(precision: str) -> None:
    # No Megatron-Core release (nor torchtitan 0.3.0) quantises before DeepEP's or Hybrid-EP's dispatch.
    spec = DispatcherSpec(kind="hierarchical", backend="deepep")
    parallel = ParallelConfig.for_world(32, ep=8, dispatcher=spec)
    cluster = load_cluster("gb200-nvl72", num_nodes=1) if precision == "mxfp8" else CLUSTER
    times = {
        p: {t.name: t.total_s for t in estimate(MODEL, TrainingSpec(seq_len=4096, global_batch=256, precision=p),
                                                parallel, cluster).breakdown}["ep_dispatch_combine"]
        for p in ("bf16", precision)
    }  # fmt: skip
    assert times[precision] == times["bf16"] > 0
