"""Honour or refuse (issue 15 item 2): a named dispatcher is in the plan or solve says why not; model-altering
techniques are offered, carried only when strictly faster; --framework limits the space to what it expresses."""

from __future__ import annotations

import pytest

from planner.catalog import load_cluster, load_model
from planner.emit import emit_megatron, emit_torchtitan
from planner.errors import InfeasiblePlanError
from planner.frameworks import framework
from planner.schema import TrainingSpec
from planner.search import SearchOptions, alters_model, solve

MIXTRAL = load_model("mixtral-8x7b")


def test_monta_under_megatron_is_refused_with_the_flag_that_allows_it() -> None:
    options = SearchOptions(dispatchers=("monta",), dispatchers_named=True)
    with pytest.raises(
        InfeasiblePlanError, match=r"--dispatcher monta: has no Megatron-LM equivalent.*--framework moeplan"
    ):
        solve(
            load_model("2x70B"),
            TrainingSpec(seq_len=8192, global_batch=64),
            load_cluster("a800-2x8", 8),
            options,
        )


def test_a_named_dispatcher_is_in_the_plan() -> None:
    options = SearchOptions(dispatchers=("monta",), dispatchers_named=True, framework="moeplan")
    plan = solve(
        load_model("2x70B"), TrainingSpec(seq_len=8192, global_batch=64), load_cluster("a800-2x8", 8), options
    ).plan
    assert plan.parallel.dispatcher.kind == "monta" and plan.parallel.ep > 1 and plan.parallel.tp > 1
    # without naming it, the same search may pick EP1 (no dispatch at all): naming is what forbids that
    named = SearchOptions(dispatchers=("hierarchical",), dispatchers_named=True)
    plan = solve(MIXTRAL, TrainingSpec(), load_cluster("dgx-h100"), named).plan
    assert plan.parallel.dispatcher.kind == "hierarchical" and plan.parallel.ep > 1


def test_a_kernel_library_the_gpu_cannot_run_is_refused() -> None:
    options = SearchOptions(dispatchers=("hybridep",), dispatchers_named=True)
    with pytest.raises(InfeasiblePlanError, match="Hybrid-EP needs compute capability 9.0"):
        solve(MIXTRAL, TrainingSpec(), load_cluster("dgx-a100"), options)


def test_model_altering_offers_need_a_framework_that_runs_them() -> None:
    with pytest.raises(InfeasiblePlanError, match="TA-MoE.*no Megatron-LM equivalent"):
        solve(MIXTRAL, TrainingSpec(), load_cluster("dgx-h100"), SearchOptions(topology_aware_routing=True))


def test_offered_techniques_are_carried_only_when_strictly_faster() -> None:
    cluster, training = load_cluster("dgx-h100"), TrainingSpec()
    plain = solve(MIXTRAL, training, cluster, SearchOptions(framework="moeplan")).plan
    # TA-MoE changes nothing under the hierarchical dispatcher, nor on one node: never carried for nothing
    ta = solve(
        MIXTRAL, training, cluster, SearchOptions(framework="moeplan", topology_aware_routing=True)
    ).plan
    assert ta.estimate is not None and plain.estimate is not None
    if ta.parallel.dispatcher.topology_aware_routing:
        assert ta.estimate.step_time_s < plain.estimate.step_time_s
        assert ta.parallel.dispatcher.kind in ("alltoall", "monta")
    else:
        assert ta.estimate.step_time_s == plain.estimate.step_time_s
    rho = solve(MIXTRAL, training, cluster, SearchOptions(framework="moeplan", condense_fraction=0.2)).plan
    assert rho.estimate is not None and alters_model(rho.parallel)
    assert rho.estimate.step_time_s < plain.estimate.step_time_s


@pytest.mark.parametrize("name", ["megatron", "torchtitan"])
def test_plans_for_a_framework_emit_for_it(name: str) -> None:
    for model, cluster in (("mixtral-8x7b", "dgx-h100"), ("qwen3-30b-a3b", "dgx-a100")):
        plan = solve(
            load_model(model),
            TrainingSpec(global_batch=256),
            load_cluster(cluster),
            SearchOptions(framework=name),
        ).plan
        assert framework(name).rules(load_model(model), plan.training, plan.parallel) == []
        emit = emit_megatron if name == "megatron" else emit_torchtitan
        assert emit(plan, load_model(model))  # raises SpecError on anything the framework cannot express
