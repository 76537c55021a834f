"""Every plan ``solve`` returns launches (issue 15, item 1), checked by ``benchmarks/launch_sweep.py``.

The benchmark enumerates the sweep (catalog model x bundled cluster x small and large global batch x
precision) and holds the checker; this module imports it from its path (``benchmarks`` is not a
package). The default suite solves ``FAST_CASES``, a handful that reach each GPU generation, a
pipeline at the small batch and each kind of refusal, and shows the checker catching plans broken on
purpose. The full sweep (624 cases, 390 solves) takes about 24 minutes on 2 cores, half of it on
h800-dsv3's 2048 GPUs, so the ``slow`` test runs a deterministic subset instead, ``SLOW_CASES`` (288
cases, 174 solves, about 7 minutes): every case of ``SLOW_MODELS`` on the five clusters other than
h800-dsv3 (both batches, every precision), and tiny-moe's on h800-dsv3. The whole sweep stays in the
benchmark: ``python benchmarks/launch_sweep.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from planner.catalog import load_cluster, load_model
from planner.errors import SpecError
from planner.feasibility import precision_rules
from planner.schema import DispatcherSpec, ParallelConfig, Plan
from planner.search import SearchOptions, solve

SWEEP_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "launch_sweep.py"


def _load_sweep() -> ModuleType:
    spec = importlib.util.spec_from_file_location("launch_sweep", SWEEP_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


sweep = _load_sweep()


def _case(label: str) -> Any:
    """The sweep's case named ``model/cluster/batch/precision`` (the batch as ``small`` or ``large``)."""
    model, cluster, batch, precision = label.split("/")
    gbs = sweep.global_batches(load_cluster(cluster).world_size)[batch]
    return sweep.Case(model, cluster, batch, gbs, precision)


FAST_CASES = {
    # An interleaved pipeline at the small batch (tp4 pp2 vpp8: 4 micro-batches per step).
    "qwen2-57b-a14b/a800-2x8/small/bf16": "plan",
    # Blackwell's mxfp8, a 9-stage pipeline over 72 GPUs at the small batch.
    "deepseek-v2-lite/gb200-nvl72/small/mxfp8": "plan",
    "tiny-moe/dgx-h100/small/fp8": "plan",
    # Fits only by offloading the optimizer, which gives FP8 parameter gather up: the plan must be priced
    # with Transformer Engine's FP8 weight cache that comes back (CI's slow sweep caught it priced without).
    "qwen3-235b-a22b/dgx-h100/small/fp8": "plan",
    "mixtral-8x7b/dgx-a100/small/bf16": "plan",  # Ampere: DeepEP may run, Hybrid-EP may not
    "tiny-moe/v100-pcie/small/fp16": "plan",  # Volta: fp16, no grouped GEMM, no NVLink
    "tiny-moe/v100-pcie/small/bf16": "exit 2: precision the GPU lacks",
    "mixtral-8x7b/dgx-a100/large/fp8": "exit 2: precision the GPU lacks",
    "mixtral-8x7b/v100-pcie/small/fp16": "exit 3: does not fit in memory",
    "tiny-moe/gb200-nvl72/small/bf16": "exit 3: no layout meets the rules",  # 4 layers: pp 9 cannot be
}
"""Representative cases and how each ends: a plan, or a refusal's exit code and reason."""

SLOW_MODELS = (
    "tiny-moe",
    "mixtral-8x7b",
    "qwen3-30b-a3b",
    "deepseek-v2-lite",
    "2x70B",
    "qwen3-235b-a22b",
    "deepseek-v3",
)
"""Each attention and expert shape (GQA and MLA; 2 experts top-1 to 256 top-8), small models that fit
everywhere and large ones that need a pipeline or do not fit (the sweep's slowest solves left out)."""
SLOW_CASES = [
    *(c for c in sweep.cases(SLOW_MODELS) if c.cluster != "h800-dsv3"),
    *sweep.cases(["tiny-moe"], ["h800-dsv3"]),
]


def test_the_sweep_has_at_least_200_solves() -> None:
    every = list(sweep.cases())
    solved = [c for c in every if not precision_rules(c.training(), load_cluster(c.cluster).gpu)]
    assert len(every) == 13 * 6 * 2 * 4
    assert len(solved) >= 200
    assert len(SLOW_CASES) == 7 * 5 * 2 * 4 + 2 * 4


def test_batches_are_small_and_large_per_world() -> None:
    assert sweep.global_batches(16) == {"small": 8, "large": 128}
    assert sweep.global_batches(72) == {"small": 32, "large": 576}
    assert sweep.global_batches(2048) == {"small": 1024, "large": 16384}


@pytest.mark.parametrize("label", list(FAST_CASES))
def test_representative_plans_launch(label: str) -> None:
    outcome = sweep.run_case(_case(label))
    assert outcome.violations == [], outcome.case.command()
    assert (outcome.kind if outcome.kind == "plan" else outcome.reason) == FAST_CASES[label], outcome.reason


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=[c.label for c in SLOW_CASES])
def test_sweep_plans_launch(case: Any) -> None:
    outcome = sweep.run_case(case)
    assert outcome.kind != "crashed", f"{outcome.reason} ({case.command()})"
    assert outcome.violations == [], case.command()


# The checker must fail on plans that cannot launch: a real plan, broken on purpose.


@pytest.fixture(scope="module")
def a800_plan() -> Plan:
    """tiny-moe on 16 A800s at global batch 8 (the small batch), as solved."""
    model, cluster = load_model("tiny-moe"), load_cluster("a800-2x8")
    plan: Plan = solve(model, _case("tiny-moe/a800-2x8/small/bf16").training(), cluster, SearchOptions()).plan
    assert sweep.launch_violations(model, cluster, plan, plan.training) == []
    return plan


def _violations(plan: Plan, parallel: ParallelConfig | None = None, **training: object) -> list[str]:
    broken = plan.model_copy(
        update={
            "parallel": parallel or plan.parallel,
            "training": plan.training.model_copy(update=training),
        }
    )
    return list(
        sweep.launch_violations(load_model("tiny-moe"), load_cluster("a800-2x8"), broken, broken.training)
    )


def test_checker_reports_a_pipeline_with_too_few_micro_batches(a800_plan: Plan) -> None:
    # pp 4 over 16 GPUs: dp 4; global batch 8 / (micro-batch 2 x dp 4) = 1 micro-batch for 4 stages.
    parallel = ParallelConfig.for_world(16, pp=4, ep=4, micro_batch=2, grouped_gemm=True)
    found = _violations(a800_plan, parallel)
    assert any(v.startswith("feasibility: micro_batches (1)") and "at least pp (4)" in v for v in found)
    assert "restated: 1 micro-batches per step cannot fill pp 4" in found


def test_checker_reports_interleaving_with_a_short_group(a800_plan: Plan) -> None:
    # pp 2, vpp 2, dp 8, micro-batch 1: 24 / 8 = 3 micro-batches, not a multiple of pp 2.
    parallel = ParallelConfig.for_world(16, pp=2, vpp=2, ep=8, grouped_gemm=True)
    found = _violations(a800_plan, parallel, global_batch=24)
    assert "restated: 3 micro-batches per step are not a multiple of pp 2 (vpp 2)" in found
    assert any("must be a multiple of pp (2) with vpp 2" in v for v in found)


def test_checker_reports_fp8_on_an_a800(a800_plan: Plan) -> None:
    found = _violations(a800_plan, precision="fp8")
    assert any(v.startswith("feasibility: precision (fp8) needs compute capability 8.9") for v in found)
    assert "restated: precision fp8 needs compute capability 8.9; A800-SXM-80GB has 8.0" in found


def test_checker_reports_hybrid_ep_on_an_a800(a800_plan: Plan) -> None:
    hybrid = DispatcherSpec(kind="hierarchical", backend="hybridep")
    parallel = a800_plan.parallel.model_copy(update={"dispatcher": hybrid, "ep": 8, "edp": 2})
    found = _violations(a800_plan, parallel)
    assert any("Hybrid-EP needs compute capability 9.0" in v for v in found), found


def test_checker_reports_a_plan_over_memory(a800_plan: Plan) -> None:
    assert a800_plan.estimate is not None
    estimate = a800_plan.estimate.model_copy(update={"fits": False, "peak_memory_bytes": 100 * 2**30})
    found = sweep.launch_violations(
        load_model("tiny-moe"),
        load_cluster("a800-2x8"),
        a800_plan.model_copy(update={"estimate": estimate}),
        a800_plan.training,
    )
    assert "memory: the estimate's peak 100.0 GiB does not fit" in found
    assert any(v.startswith("estimate: peak_memory_bytes") for v in found)


def test_a_crash_and_a_bad_input_refusal_fail_the_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    case = _case("tiny-moe/a800-2x8/small/bf16")

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyError("tp")

    monkeypatch.setattr(sweep, "solve", crash)
    crashed = sweep.run_case(case)
    assert (crashed.kind, crashed.failed) == ("crashed", True)
    assert crashed.reason.startswith("KeyError at test_launch_sweep.py:")

    def refuse(*args: object, **kwargs: object) -> None:
        raise SpecError("precision (bf16) is not run by this GPU.")

    monkeypatch.setattr(sweep, "solve", refuse)
    refused = sweep.run_case(case)
    assert (refused.kind, refused.failed) == ("refused", True)
    assert sweep.report([refused, crashed], 0.0).count("FAILED") == 2
