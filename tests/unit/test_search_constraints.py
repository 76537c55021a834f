"""Constraints users ask for (issue 15 item 3): fixed and bounded degrees, the recompute choice, and the
memory every GPU keeps free (``--memory-margin``)."""

from __future__ import annotations

import json

import pytest

from planner.catalog import load_cluster, load_model
from planner.errors import InfeasiblePlanError, SpecError
from planner.schema import CheckSearch, TrainingSpec, memory_margin_bytes
from planner.search import SearchOptions, solve
from planner.units import GIB
from tests.cli.invoke import invoke

MIXTRAL = load_model("mixtral-8x7b")
H100 = load_cluster("dgx-h100")


@pytest.mark.parametrize(
    ("text", "gib"),
    [("5%", 4.0), ("0.05", 4.0), ("4GiB", 4.0), ("4 gib", 4.0), ("2.5G", 2.5), ("0", 0.0), (".1", 8.0)],
)
def test_a_margin_is_a_percentage_a_fraction_or_gib(text: str, gib: float) -> None:
    assert memory_margin_bytes(text, 80 * GIB) == pytest.approx(gib * GIB)


@pytest.mark.parametrize(
    ("text", "rule"), [("4", "ambiguous: write 4GiB"), ("60%", "below 50%"), ("lots", "not a percentage")]
)
def test_a_margin_that_is_not_one_names_the_rule(text: str, rule: str) -> None:
    with pytest.raises(ValueError, match=rule):
        memory_margin_bytes(text, 80 * GIB)
    with pytest.raises(ValueError, match=rule):
        CheckSearch(memory_margin=text)


def test_fixed_degrees_are_in_the_plan_and_bounds_hold() -> None:
    fixed = SearchOptions(fixed=(("tp", 1), ("pp", 4)), maxima=(("ep", 4),))
    p = solve(MIXTRAL, TrainingSpec(), H100, fixed).plan.parallel
    assert (p.tp, p.pp) == (1, 4) and p.ep <= 4
    free = solve(MIXTRAL, TrainingSpec(), H100).plan.parallel
    assert (free.tp, free.pp, free.ep) != (p.tp, p.pp, p.ep)  # the constraint changed the answer


def test_the_recompute_choice_is_held() -> None:
    options = SearchOptions(recompute=(("full", ()),))
    assert solve(MIXTRAL, TrainingSpec(), H100, options).plan.parallel.recompute == "full"


def test_the_margin_is_kept_on_every_gpu() -> None:
    packed = solve(MIXTRAL, TrainingSpec(), H100, SearchOptions(memory_margin="0")).plan
    assert packed.estimate is not None and packed.solver is not None
    hbm = H100.gpu.hbm_gib * GIB
    margin = hbm - packed.estimate.peak_memory_bytes + 1 * GIB  # more than the packed plan leaves free
    held = solve(MIXTRAL, TrainingSpec(), H100, SearchOptions(memory_margin=f"{margin / GIB}GiB")).plan
    assert held.estimate is not None and held.solver is not None
    assert held.estimate.peak_memory_bytes <= hbm - margin
    assert held.solver.memory_margin_bytes == pytest.approx(margin)
    assert held.estimate.step_time_s >= packed.estimate.step_time_s  # a tighter limit is never faster


def test_impossible_constraints_are_input_errors() -> None:
    with pytest.raises(SpecError, match="--tp 3: a parallel degree must divide the 32 GPUs"):
        solve(MIXTRAL, TrainingSpec(), H100, SearchOptions(fixed=(("tp", 3),)))
    with pytest.raises(SpecError, match="--ep 16: the expert parallel degree must divide the 8 experts"):
        solve(MIXTRAL, TrainingSpec(), load_cluster("dgx-h100", 2), SearchOptions(fixed=(("ep", 16),)))
    with pytest.raises(SpecError, match="--memory-margin 90GiB keeps all"):
        solve(MIXTRAL, TrainingSpec(), H100, SearchOptions(memory_margin="90GiB"))


def test_constraints_no_layout_meets_are_named() -> None:
    # pp 8 on 8 GPUs with 4 micro-batches of 1 breaks the pipeline rule for every layout
    with pytest.raises(InfeasiblePlanError, match="has --pp 8 --mbs 1"):
        solve(
            MIXTRAL, TrainingSpec(global_batch=4), H100, SearchOptions(fixed=(("pp", 8), ("micro_batch", 1)))
        )


def test_solve_flags() -> None:
    code, out, _ = invoke("solve", "--model", "mixtral-8x7b", "--cluster", "dgx-h100", "--tp", "2",
                          "--max-ep", "4", "--recompute", "full", "--memory-margin", "10%", "--json")  # fmt: skip
    assert code == 0
    plan = json.loads(out)
    p = plan["parallel"]
    assert p["tp"] == 2 and p["ep"] <= 4 and p["recompute"] == "full"
    assert plan["solver"]["memory_margin_bytes"] == pytest.approx(0.1 * H100.gpu.hbm_gib * GIB)
    code, _, err = invoke("solve", "--model", "mixtral-8x7b", "--cluster", "dgx-h100", "--memory-margin", "4")
    assert code == 2 and "--memory-margin" in err and "ambiguous" in err
