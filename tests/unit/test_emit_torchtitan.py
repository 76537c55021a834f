"""The torchtitan launch, read by torchtitan 0.3.0 itself (installed by the dev extra).

``torchtitan_check.py`` parses each emitted launch with torchtitan's ``ConfigManager`` and builds its
device mesh on a fake process group; the shipped config functions moeplan names are built and compared
with the catalog models they stand for. Skipped where torchtitan is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

from planner.accuracy.golden import load_case, solve_case
from planner.catalog import load_model
from planner.emit import TORCHTITAN_VERSION, torchtitan_config
from planner.emit.torchtitan import SHIPPED_CONFIGS, TorchtitanLaunch
from planner.schema import ModelSpec, Plan, TrainingSpec
from tests.unit.test_emit import deepseek_plan, mixtral_plan, monta_plan, tiny_plan, titan

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torchtitan") is None, reason="torchtitan not installed (the dev extra has it)"
)

CHECKER = Path(__file__).with_name("torchtitan_check.py")
GOLDEN = Path(__file__).parents[2] / "examples" / "golden"
STAND_IN = ("qwen3", "qwen3_moe_debug")
"""A small MoE config function, for models torchtitan ships none for: the overrides are what is checked."""


def test_torchtitan_installed_is_the_targeted_release() -> None:
    from importlib.metadata import version

    assert version("torchtitan") == TORCHTITAN_VERSION


def _expect(launch: TorchtitanLaunch) -> dict[str, Any]:
    """The fields torchtitan must read back, as its config holds them."""
    return dict(launch.overrides)


def _case(plan: Plan, model: ModelSpec) -> dict[str, Any]:
    launch = torchtitan_config(plan, model)
    module, config = (launch.shipped.module, launch.shipped.config) if launch.shipped else STAND_IN
    return {
        "module": module,
        "config": config,
        "args": launch.args(),
        "subcommand": launch.subcommand,
        "world": plan.num_gpus,
        "num_layers": model.num_layers,
        "expect": _expect(launch),
    }


def _torchtitan_reads(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, str(CHECKER)],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results: list[dict[str, Any]] = json.loads(done.stdout)
    return results


def test_shipped_config_functions_build_the_catalog_models() -> None:
    """Each config function moeplan names builds the model it stands for (layers, width, experts, top-k,
    vocabulary), read from torchtitan's own config, and each catalog model it stands for is matched."""
    import importlib

    for shipped in SHIPPED_CONFIGS:
        with warnings.catch_warnings():  # torch's own deprecations, raised while torchtitan imports
            warnings.simplefilter("ignore")
            registry = importlib.import_module(f"torchtitan.models.{shipped.module}.config_registry")
            model = getattr(registry, shipped.config)().model_spec.model
        moe = [layer.moe for layer in model.layers if getattr(layer, "moe", None) is not None]
        built = (len(model.layers), model.dim, moe[0].num_experts, moe[0].router.top_k, model.vocab_size)
        assert built == (
            shipped.num_layers,
            shipped.hidden_size,
            shipped.num_experts,
            shipped.moe_router_topk,
            shipped.vocab_size,
        ), shipped.config
    for name, config in [
        ("deepseek-v3", "deepseek_v3_671b"),
        ("deepseek-v2-lite", "deepseek_v3_16b"),
        ("qwen3-30b-a3b", "qwen3_30b_a3b"),
        ("gpt-oss-120b", "gpt_oss_120b"),
    ]:
        assert [c.config for c in SHIPPED_CONFIGS if c.builds(load_model(name))] == [config]
    assert not any(c.builds(load_model("mixtral-8x7b")) for c in SHIPPED_CONFIGS)


def test_torchtitan_reads_the_emitted_launches() -> None:
    plans = [
        titan(mixtral_plan()),
        titan(deepseek_plan()),
        titan(tiny_plan()),
        titan(tiny_plan(recompute="selective")),
        titan(monta_plan().model_copy(update={"training": TrainingSpec(seq_len=8192, global_batch=16)})),
    ]
    cases = [_case(plan, load_model(plan.model.name)) for plan in plans]
    for plan, result in zip(plans, _torchtitan_reads(cases), strict=True):
        assert result == {"ok": True}, (plan.model.name, result)


def test_torchtitan_refuses_a_broken_launch() -> None:
    """The checker can fail: an EP that no efsdp divides, and a misspelt flag, are refused by torchtitan."""
    case = _case(titan(mixtral_plan()), load_model("mixtral-8x7b"))
    bad_ep = dict(case, args=[*case["args"], "--parallelism.expert_parallel_degree", "3"], expect={})
    misspelt = dict(case, args=[*case["args"], "--parallelism.expert_tensor_parallel_degree", "2"])
    results = _torchtitan_reads([bad_ep, misspelt])
    assert [r["ok"] for r in results] == [False, False]
    assert "expert_tensor_parallel_degree" in results[1]["error"]


@pytest.mark.slow
def test_every_golden_case_solved_for_torchtitan_launches_there() -> None:
    """``solve --framework torchtitan`` on every golden case: a plan whose launch torchtitan reads, or no
    layout at all (the cases that fit only with what torchtitan lacks); never a plan the emitter refuses."""
    cases, names, infeasible = [], [], []
    for path in sorted(GOLDEN.glob("*.check.yaml")):
        case = load_case(path)
        case = case.model_copy(update={"search": case.search.model_copy(update={"framework": "torchtitan"})})
        plan = solve_case(case, path)
        if plan is None:
            infeasible.append(path.name)
            continue
        cases.append(_case(plan, load_model(plan.model.name)))
        names.append(path.name)
    assert len(cases) >= 12, (names, infeasible)
    for name, result in zip(names, _torchtitan_reads(cases), strict=True):
        assert result == {"ok": True}, (name, result)
