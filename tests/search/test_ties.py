"""The tie rule: among equally fast stage splits the search reports one of its own choosing, whatever
split the ILP returned first (so the plan does not depend on the solver's version)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from planner.catalog import load_cluster, load_model
from planner.costmodel.estimate import LayoutCosts, evaluate, layout_costs
from planner.costmodel.memory import split_chunks
from planner.schema import Plan
from planner.search.ilp import canonical_stages

GOLDEN = Path(__file__).parents[2] / "examples" / "golden" / "dbrx-dgx-h100-8n.plan.json"


def _dbrx() -> tuple[Plan, LayoutCosts]:
    # DBRX on 8 DGX-H100 nodes: pp 2, vpp 8, 40 layers in 16 chunks, a layout with many equal splits.
    plan = Plan.model_validate(json.loads(GOLDEN.read_text()))
    costs = layout_costs(load_model("dbrx"), plan.training, plan.parallel, load_cluster("dgx-h100", 8))
    return plan, costs


def _step(plan: Plan, costs: LayoutCosts, sizes: tuple[int, ...]) -> float:
    parallel = plan.parallel.model_copy(update={"layers_per_stage": sizes})
    return evaluate(costs, split_chunks(costs.context.model, parallel)).step_time_s


def test_the_same_split_whatever_optimal_split_the_solver_started_from() -> None:
    plan, costs = _dbrx()
    # Three splits with the same rank totals (20 layers each), the same largest chunk (3 layers) and the
    # same last chunk (which also holds the output layer).
    starts = [
        (3,) * 8 + (2,) * 8,  # the even split
        (3, 3, 3, 3, 3, 3, 2, 2, 3, 3, 2, 2, 2, 2, 2, 2),
        (3,) * 12 + (1,) * 4,
    ]
    optimum = _step(plan, costs, starts[0])
    assert all(math.isclose(_step(plan, costs, s), optimum, rel_tol=1e-12) for s in starts)
    canonical = {canonical_stages(costs, optimum, start, 10.0) for start in starts}
    assert canonical == {(3,) * 12 + (1,) * 4}  # the lexicographically largest of the ties
    assert canonical == {tuple(plan.parallel.layers_per_stage or ())}  # what the golden plan reports


def test_refuses_a_split_that_does_not_hold_every_layer() -> None:
    plan, costs = _dbrx()
    even = (3,) * 8 + (2,) * 8
    assert canonical_stages(costs, _step(plan, costs, even), (3,) * 8 + (2,) * 7 + (1,), 10.0) is None
