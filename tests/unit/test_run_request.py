"""What ``moeplan run`` makes of a plan: every setting is run, or replaced by what runs and named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from planner.emit import load_plan, write_plan
from planner.errors import SpecError
from planner.schema import ParallelConfig, TrainingSpec
from planner.workflows.run_request import RUNTIME_LIMITS, RUNTIME_RUNS, RunAsk, build_run_request
from tests.conftest import REPO

GOLDEN = REPO / "examples" / "golden"


def _paths(prefix: str, spec: type[BaseModel]) -> set[str]:
    found: set[str] = set()
    for name, field in spec.model_fields.items():
        nested: Any = field.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            found |= _paths(f"{prefix}.{name}", nested)
        else:
            found.add(f"{prefix}.{name}")
    return found


def test_every_plan_setting_is_run_or_named() -> None:
    settings = _paths("parallel", ParallelConfig) | _paths("training", TrainingSpec)
    assert "parallel.dispatcher.backend" in settings  # the nested dispatcher spec is walked
    assert not set(RUNTIME_RUNS) & set(RUNTIME_LIMITS)
    assert settings == set(RUNTIME_RUNS) | set(RUNTIME_LIMITS), settings ^ (
        set(RUNTIME_RUNS) | set(RUNTIME_LIMITS)
    )


@pytest.fixture
def plan_file(tmp_path: Path) -> Path:
    """tiny-moe's golden plan made a 2-GPU plan with full recompute (no ranks are started here)."""
    plan = load_plan(GOLDEN / "tiny-moe-v100-pcie.plan.json")
    plan = plan.model_copy(
        update={
            "num_gpus": 2, "num_nodes": 1, "num_gpus_per_node": 2, "estimate": None,
            "parallel": ParallelConfig.for_world(2, ep=2, recompute="full"),
            "training": TrainingSpec(seq_len=32, global_batch=4),
        }
    )  # fmt: skip
    write_plan(tmp_path / "plan.json", plan)
    return tmp_path / "plan.json"


def test_a_plan_setting_the_runtime_lacks_is_replaced_and_named(plan_file: Path) -> None:
    request = build_run_request(RunAsk(plan_path=plan_file))
    ignored = {entry.field: entry for entry in request.ignored}
    assert ignored["parallel.recompute"].value == "full" and ignored["parallel.recompute"].runs == "none"
    assert request.options.parallel.recompute == "none" and not request.options.parallel.distributed_optimizer
    assert (request.options.seq_len, request.options.global_batch, request.options.ranks_per_node) == (
        32,
        4,
        2,
    )


def test_strict_refuses_and_a_set_asking_for_it_is_refused(plan_file: Path) -> None:
    with pytest.raises(SpecError, match=r"--strict: .*parallel.recompute 'full' is not run"):
        build_run_request(RunAsk(plan_path=plan_file, strict=True))
    with pytest.raises(SpecError, match="parallel.fsdp True asks for what the bundled runtime does not run"):
        build_run_request(RunAsk(plan_path=plan_file, assignments=(("parallel.fsdp", True),)))


def test_changes_by_dotted_path_and_shorthand_are_one_mechanism(plan_file: Path) -> None:
    request = build_run_request(
        RunAsk(plan_path=plan_file, nproc=4, assignments=(("parallel.ep", 4), ("training.seq_len", 64)))
    )
    p = request.options.parallel
    assert (p.ep, p.dp, p.edp, request.options.seq_len) == (4, 4, 1, 64)
    with pytest.raises(SpecError, match=r"--set field 'parallel.epp'"):
        build_run_request(RunAsk(plan_path=plan_file, assignments=(("parallel.epp", 4),)))


def test_a_plan_on_fewer_ranks_than_its_gpus_is_refused_with_what_to_change(plan_file: Path) -> None:
    with pytest.raises(SpecError, match=r"does not fit its 1 ranks: .*the plan's degrees are for its 2 GPUs"):
        build_run_request(RunAsk(plan_path=plan_file, nproc=1))
