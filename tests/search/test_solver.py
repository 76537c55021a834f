"""The solver: the ILP's optimum equals brute force over the same cost model, and known-answer cases."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from planner import search
from planner.catalog import load_cluster, load_model
from planner.costmodel import estimate
from planner.costmodel.estimate import layout_costs
from planner.errors import InfeasiblePlanError
from planner.feasibility import check_plan
from planner.schema import TrainingSpec
from planner.search import SearchOptions, solve
from planner.search.bounds import lower_bound, memory_bound, memory_floor, memory_may_fit
from planner.search.ilp import solve_stages
from planner.search.space import candidate_layouts
from planner.units import GIB

# Spaces small enough to enumerate every stage assignment of every layout (the --exhaustive oracle).
SMALL = {
    "recompute": (("none", ()), ("full", ())),
    "dispatchers": ("alltoall", "hierarchical"),
    "overlap": (False,),
}
EXACTNESS_CASES = [
    ("tiny-moe", "a800-2x8", 1, TrainingSpec(global_batch=32), SearchOptions()),
    ("tiny-moe", "dgx-h100", 2, TrainingSpec(global_batch=64, precision="fp8"), SearchOptions()),
    (
        "mixtral-8x7b",
        "dgx-h100",
        2,
        TrainingSpec(global_batch=64),
        SearchOptions(fixed=(("pp", 2),), virtual_stages=(1, 2), micro_batches=(1,), **SMALL),  # type: ignore[arg-type]
    ),
    (
        "deepseek-v2-lite",
        "a800-2x8",
        2,
        TrainingSpec(global_batch=64),
        SearchOptions(fixed=(("pp", 2),), virtual_stages=(1, 2), micro_batches=(1,), **SMALL),  # type: ignore[arg-type]
    ),
    (
        "qwen3-30b-a3b",
        "dgx-h100",
        4,
        TrainingSpec(global_batch=128),
        SearchOptions(fixed=(("pp", 4), ("tp", 1)), virtual_stages=(1,), micro_batches=(1,), **SMALL),  # type: ignore[arg-type]
    ),
    (
        "gpt-oss-120b",
        "dgx-h100",
        4,
        TrainingSpec(global_batch=128, precision="fp8"),
        SearchOptions(fixed=(("pp", 2), ("ep", 16)), virtual_stages=(1, 2), micro_batches=(1,), **SMALL),  # type: ignore[arg-type]
    ),
    # Fits on 8 A100s only with optimizer state on the host: the precision-aware and offload rungs.
    (
        "mixtral-8x7b",
        "dgx-a100",
        1,
        TrainingSpec(global_batch=16),
        SearchOptions(maxima=(("pp", 4),), virtual_stages=(1,), micro_batches=(1,), **SMALL),  # type: ignore[arg-type]
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model_name", "cluster_name", "nodes", "training", "options"),
    EXACTNESS_CASES,
    ids=[f"{c[0]}-{c[1]}x{c[2]}" for c in EXACTNESS_CASES],
)
def test_ilp_optimum_equals_brute_force(
    model_name: str, cluster_name: str, nodes: int, training: TrainingSpec, options: SearchOptions
) -> None:
    model, cluster = load_model(model_name), load_cluster(cluster_name, nodes)
    ilp = solve(model, training, cluster, options)
    brute = solve(model, training, cluster, options, exhaustive=True, time_limit_s=600)
    assert ilp.plan.solver is not None and ilp.plan.solver.optimal
    assert brute.plan.solver is not None and brute.plan.solver.optimal  # enumerated to the end
    assert ilp.plan.estimate is not None and brute.plan.estimate is not None
    assert ilp.plan.estimate.step_time_s == pytest.approx(brute.plan.estimate.step_time_s, rel=1e-6)
    assert brute.solved >= ilp.solved  # the oracle priced every layout, the ILP's search pruned


def test_plan_is_feasible_and_reproduces_its_estimate() -> None:
    model, cluster = load_model("mixtral-8x7b"), load_cluster("dgx-h100", 2)
    training = TrainingSpec(global_batch=64)
    plan = solve(model, training, cluster).plan
    assert check_plan(model, training, plan.parallel, cluster.world_size) == []
    assert plan.estimate is not None and plan.estimate.fits
    # The plan's own estimate is what estimate() says for its configuration (stage split included).
    assert estimate(model, training, plan.parallel, cluster) == plan.estimate


def test_identical_inputs_give_identical_plans() -> None:
    model, cluster = load_model("tiny-moe"), load_cluster("a800-2x8", 1)
    first = solve(model, TrainingSpec(global_batch=32), cluster).plan
    second = solve(model, TrainingSpec(global_batch=32), cluster).plan
    assert first.model_dump(exclude={"solver"}) == second.model_dump(exclude={"solver"})


def test_slow_inter_node_link_keeps_expert_parallelism_inside_a_node() -> None:
    # Known answer: with a very slow scale-out link the EP all-to-all must not cross nodes.
    model = load_model("mixtral-8x7b")
    cluster = load_cluster("v100-pcie")  # 2 nodes of 8, 0.78 GB/s per GPU between them
    data = cluster.model_dump()
    data["gpu"] = load_cluster("dgx-a100").gpu.model_dump()  # 80 GiB so that the model fits
    cluster = type(cluster).model_validate(data)
    plan = solve(model, TrainingSpec(global_batch=64), cluster).plan
    p = plan.parallel
    assert p.ep * p.etp <= cluster.num_gpus_per_node and p.tp <= cluster.num_gpus_per_node


def test_small_model_on_one_node_needs_no_pipeline() -> None:
    plan = solve(load_model("tiny-moe"), TrainingSpec(global_batch=64), load_cluster("dgx-h100", 1)).plan
    assert plan.parallel.pp == 1


def test_model_that_cannot_fit_names_the_binding_constraint() -> None:
    # 8 A800s cannot hold 2x70B's weights and gradients (6 bytes x 125B / 8), whatever moves to the host.
    with pytest.raises(
        InfeasiblePlanError, match=r"does not fit on 8 GPUs .*on the CPU.* needs at least \d+ GPUs"
    ):
        solve(load_model("2x70B"), TrainingSpec(global_batch=16), load_cluster("a800-2x8", 1))


def test_memory_bound_is_admissible_and_knows_what_cannot_fit() -> None:
    # deepseek-v2-lite at 16K tokens on 8 A800: some layouts pass the average-rank memory floor yet fit
    # under no stage assignment, and in others memory pushes layers off the first ranks. memory_bound,
    # which spares the search those ILPs, must never exceed the ILP's optimum nor call a layout the ILP
    # can fit unfit.
    model, cluster = load_model("deepseek-v2-lite"), load_cluster("a800-2x8", 1)
    training = TrainingSpec(global_batch=64, seq_len=16384)
    options = SearchOptions(
        micro_batches=(1,), overlap=(False,), dispatchers=("alltoall",), recompute=(("none", ()),)
    )
    layouts = candidate_layouts(model, training, cluster.world_size, 8, options, cluster.gpu)
    capacity = cluster.gpu.hbm_gib * GIB
    costs = [layout_costs(model, training, p, cluster) for p in layouts]
    costs = [c for c in costs if memory_floor(c.memory, model) <= capacity]
    unfit = raised = 0
    for c in costs:
        bound = memory_bound(c, capacity)
        found = solve_stages(c, 60.0, 1e-6).result
        assert memory_may_fit(c, capacity) == (bound != math.inf)
        if bound == math.inf:
            unfit += 1
            assert found.status == "infeasible", c.context.parallel
        elif found.objective is not None:
            raised += bound > lower_bound(c) * (1 + 1e-9)
            assert bound <= found.objective * (1 + 1e-9), c.context.parallel
    assert 0 < unfit < len(costs) and raised > 0


def test_layouts_left_unsolved_by_the_memory_bound_change_no_reported_plan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The search leaves unsolved the layouts whose memory_bound is above the incumbent unless one could be
    # among the alternatives: the plan and the alternatives are those of the search that solves them all.
    model, cluster = load_model("qwen2-57b-a14b"), load_cluster("a800-2x8", 4)  # a golden case
    training = TrainingSpec(global_batch=512)
    options = SearchOptions()  # under the default margin this case has layouts the bound leaves unsolved
    fast = solve(model, training, cluster, options)
    monkeypatch.setattr(
        search,
        "memory_bound",
        lambda costs, capacity: lower_bound(costs) if memory_may_fit(costs, capacity) else math.inf,
    )
    every = solve(model, training, cluster, options)
    assert fast.plan.model_dump(exclude={"solver"}) == every.plan.model_dump(exclude={"solver"})
    assert fast.alternatives == every.alternatives
    assert fast.solved < every.solved


def test_a_search_keeps_none_of_its_layouts_once_it_returns() -> None:
    # PuLP keeps exceptions from its import, whose tracebacks hold every frame below it: imported from
    # inside solve(), they kept the whole search alive until exit. A fresh interpreter imports it there.
    script = (
        "import gc; from planner.catalog import load_cluster, load_model; from planner.schema import "
        "ParallelConfig, TrainingSpec; from planner.search import solve; "
        "solve(load_model('mixtral-8x7b'), TrainingSpec(global_batch=64), load_cluster('dgx-h100', 2)); "
        "import planner.search.ilp; gc.collect(); "
        "print(sum(isinstance(o, ParallelConfig) for o in gc.get_objects()))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert int(done.stdout) < 10  # the plan's and its alternatives', not the search's thousands


def test_the_alternatives_are_the_best_plan_of_each_other_structure() -> None:
    # The exhaustive oracle visits every layout, so its alternatives are the true best of each other
    # structure; the branch and bound must report the same ones, not merely those it met on its way.
    model, cluster = load_model("deepseek-v2-lite"), load_cluster("dgx-h100", 1)
    options = SearchOptions(
        virtual_stages=(1,),
        micro_batches=(1,),
        recompute=(("none", ()), ("full", ())),
        overlap=(False,),
        maxima=(("pp", 4),),  # the exhaustive oracle's stage assignments stay few (about 7 s)
    )
    training = TrainingSpec(global_batch=64)
    fast = solve(model, training, cluster, options, top_k=3)
    every = solve(model, training, cluster, options, top_k=3, exhaustive=True, time_limit_s=600)
    assert len(every.alternatives) == 3
    assert [a.structure for a in fast.alternatives] == [a.structure for a in every.alternatives]
    for mine, truth in zip(fast.alternatives, every.alternatives, strict=True):
        assert mine.estimate.step_time_s == pytest.approx(truth.estimate.step_time_s, rel=1e-6)
