"""``parallel.delay_wgrad_compute`` (Megatron's ``--delay-wgrad-compute``): priced by the EP overlap's
schedule, emitted as stated, refused without the overlap, stateable by validation files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from planner.accuracy.validate import validate_suite
from planner.accuracy.validation_file import load_validation_file
from planner.catalog import load_model
from planner.emit import megatron_args
from planner.errors import SpecError
from planner.feasibility import check_plan
from planner.overrides import override_plan
from planner.schema import ParallelConfig
from planner.workflows.run_request import RunAsk, build_run_request
from tests.cli.invoke import invoke
from tests.unit.stated_cases import unstated_and_stated, write_pair
from tests.unit.test_emit import mixtral_plan
from tests.unit.test_overlap_grad_reduce import tiny_plan_file

MODEL = load_model("mixtral-8x7b")


def _overlapped(case: dict[str, Any]) -> bool:
    return case["id"] == "MLR-DSV3-B200"  # EP overlap whose backward dispatch shows beside the experts


def test_an_unstated_setting_follows_the_overlap_as_moeplan_emitted_it() -> None:
    # Plans written before the setting existed asked for --delay-wgrad-compute with every EP overlap.
    assert ParallelConfig.for_world(16, ep=4, a2a_overlap=True).delay_wgrad_compute is True
    assert ParallelConfig.for_world(16, ep=4).delay_wgrad_compute is False
    stated = ParallelConfig.for_world(16, ep=4, a2a_overlap=True, delay_wgrad_compute=False)
    assert stated.delay_wgrad_compute is False


def test_rule_18_needs_the_overlap() -> None:
    alone = ParallelConfig.for_world(16, tp=2, pp=2, vpp=2, ep=4, delay_wgrad_compute=True)
    assert [v.field for v in check_plan(MODEL, mixtral_plan().training, alone, 16)] == ["delay_wgrad_compute"]
    paired = alone.model_copy(update={"a2a_overlap": True})
    assert check_plan(MODEL, mixtral_plan().training, paired, 16) == []


def test_megatron_flag_follows_the_setting() -> None:
    delayed = megatron_args(mixtral_plan(a2a_overlap=True), MODEL)
    assert "--overlap-moe-expert-parallel-comm" in delayed and "--delay-wgrad-compute" in delayed
    inline = megatron_args(mixtral_plan(a2a_overlap=True, delay_wgrad_compute=False), MODEL)
    assert "--overlap-moe-expert-parallel-comm" in inline and "--delay-wgrad-compute" not in inline


def test_delaying_shortens_an_overlapped_step_whose_backward_dispatch_shows(tmp_path: Path) -> None:
    unstated, stated = unstated_and_stated(
        tmp_path, "locked-moe.yaml", _overlapped, {"delay_wgrad_compute": True}
    )

    def ep_exposed(result: Any) -> float:
        return next(t.exposed_s for t in result.estimate.breakdown if t.name == "ep_dispatch_combine")

    assert ep_exposed(stated) < ep_exposed(unstated)
    assert stated.estimate.step_time_s < unstated.estimate.step_time_s


def test_a_validation_case_stating_it_without_the_overlap_cannot_have_run(tmp_path: Path) -> None:
    path = write_pair(
        tmp_path, "locked-moe.yaml", _overlapped, {"delay_wgrad_compute": True, "a2a_overlap": False}
    )
    with pytest.raises(SpecError, match="delay_wgrad_compute"):
        validate_suite(load_validation_file(path))


def test_turning_the_overlap_off_takes_the_delay_with_it() -> None:
    plan = mixtral_plan(a2a_overlap=True)
    changed, notes = override_plan(plan, [("parallel.a2a_overlap", False)])
    assert changed.parallel.delay_wgrad_compute is False
    assert notes == ["delay_wgrad_compute follows a2a_overlap: false"]
    # A value pydantic reads as false ("n", "off") takes it too, as does the overlap's own shorthand.
    said, _ = override_plan(plan, [("parallel.a2a_overlap", "n")])
    assert (said.parallel.a2a_overlap, said.parallel.delay_wgrad_compute) == (False, False)
    kept, _ = override_plan(
        mixtral_plan(), [("parallel.a2a_overlap", True), ("parallel.delay_wgrad_compute", False)]
    )
    assert kept.parallel.delay_wgrad_compute is False


def test_solve_delays_with_every_overlap_and_estimate_follows_the_flag() -> None:
    base = ("--model", "mixtral-8x7b", "--cluster", "dgx-h100", "--nodes", "2", "--json")
    code, stdout, _ = invoke("solve", *base, "--tp", "2", "--ep", "4")
    assert code == 0
    parallel = json.loads(stdout)["parallel"]
    assert parallel["delay_wgrad_compute"] == parallel["a2a_overlap"]
    code, stdout, _ = invoke("estimate", *base, "--tp", "2", "--ep", "4", "--a2a-overlap")
    assert code == 0 and json.loads(stdout)["parallel"]["delay_wgrad_compute"] is True


def test_run_names_the_delay_it_does_not_run(tmp_path: Path) -> None:
    path = tiny_plan_file(tmp_path, ParallelConfig.for_world(2, ep=2, a2a_overlap=True))
    request = build_run_request(RunAsk(plan_path=path))
    ignored = {entry.field: entry for entry in request.ignored}
    assert ignored["parallel.delay_wgrad_compute"].value is True
    assert request.options.parallel.delay_wgrad_compute is False
