"""``moeplan estimate --plan`` re-prices a plan exactly, uneven stages included, and ``--layers-per-stage``
hand-edits its split (issue 15 item 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.schema import Plan
from tests.cli.invoke import invoke

GOLDEN = Path(__file__).parents[2] / "examples" / "golden"
PLANS = sorted(p for p in GOLDEN.glob("*.plan.json") if "infeasible" not in p.name)


def _estimate(*args: str) -> dict[str, float]:
    code, out, err = invoke("estimate", *args, "--json")
    assert code == 0, err
    estimate: dict[str, float] = json.loads(out)["estimate"]
    return estimate


@pytest.mark.parametrize("path", PLANS, ids=[p.name.removesuffix(".plan.json") for p in PLANS])
def test_a_plan_is_repriced_as_solve_priced_it(path: Path) -> None:
    plan = Plan.model_validate(json.loads(path.read_text()))
    assert plan.estimate is not None
    again = _estimate("--plan", str(path))
    # The plan file keeps 6 significant digits.
    assert again["step_time_s"] == pytest.approx(plan.estimate.step_time_s, rel=1e-5)
    assert again["peak_memory_bytes"] == pytest.approx(plan.estimate.peak_memory_bytes, rel=1e-5)


def _uneven(path: Path) -> bool:
    split = Plan.model_validate(json.loads(path.read_text())).parallel.layers_per_stage
    return split is not None and len(set(split)) > 1


def test_layers_per_stage_hand_edits_the_split() -> None:
    path = next(p for p in PLANS if _uneven(p))  # a golden plan the solver split unevenly
    plan = Plan.model_validate(json.loads(path.read_text()))
    split = plan.parallel.layers_per_stage
    assert split is not None
    same = _estimate("--plan", str(path), "--layers-per-stage", ",".join(map(str, split)))
    assert plan.estimate is not None
    assert same["step_time_s"] == pytest.approx(plan.estimate.step_time_s, rel=1e-5)
    # Everything in the first chunk but one layer per other chunk: a far slower pipeline.
    chunks, layers = len(split), sum(split)
    lopsided = [layers - chunks + 1] + [1] * (chunks - 1)
    edited = _estimate("--plan", str(path), "--layers-per-stage", ",".join(map(str, lopsided)))
    assert edited["step_time_s"] > 1.2 * plan.estimate.step_time_s


def test_a_split_that_does_not_hold_the_model_is_refused() -> None:
    path = GOLDEN / "qwen3-30b-a3b-dgx-a100-4n.plan.json"
    code, _, err = invoke("estimate", "--plan", str(path), "--layers-per-stage", "1,2,3")
    assert code == 2 and "layers_per_stage" in err
    code, _, err = invoke("estimate", "--plan", str(path), "--layers-per-stage", "a,b")
    assert code == 2 and "--layers-per-stage 'a,b'" in err
