"""Router fusion as a plan setting (issue 17 item 2, TE fusions; ``ParallelConfig.moe_router_fusion``): priced
(without it the host launches the 41 router kernels the fusion removes, Megatron-LM's GB200 guide: 72 to 31),
emitted (``--moe-router-fusion``, core 0.14 on), off in plans for frameworks without Transformer Engine's
router, stated by validation files, and named by ``moeplan run``, whose runtime routes with its own ops."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from planner.catalog import load_cluster, load_model
from planner.costmodel import estimate
from planner.costmodel.compute import HOST_PASSES, host_us_per_kernel
from planner.costmodel.dispatchers import UNFUSED_ROUTER_KERNELS
from planner.emit import megatron_args
from planner.errors import SpecError
from planner.frameworks import framework
from planner.schema import ParallelConfig, TrainingSpec
from planner.workflows.run_request import RunAsk, build_run_request
from tests.unit.stated_cases import unstated_and_stated
from tests.unit.test_emit import mixtral_plan
from tests.unit.test_overlap_grad_reduce import tiny_plan_file

MODEL = load_model("qwen3-30b-a3b")  # a fine-grained MoE: host-bound in eager mode on H100s
CLUSTER = load_cluster("dgx-h100", num_nodes=2)
TRAINING = TrainingSpec(seq_len=4096, global_batch=256)


def _host_bound(fusion: bool) -> tuple[float, float]:
    parallel = ParallelConfig.for_world(16, ep=8, moe_router_fusion=fusion)
    result = estimate(MODEL, TRAINING, parallel, CLUSTER)
    terms = {t.name: t.exposed_s for t in result.breakdown}
    return terms["host_launch_bound"], result.step_time_s


def test_unfused_routers_cost_the_host_their_launches() -> None:
    fused, step_fused = _host_bound(True)
    unfused, step_unfused = _host_bound(False)
    assert UNFUSED_ROUTER_KERNELS == 41
    # Host-bound on both sides: every extra launch shows, forward and backward, in every MoE layer and
    # micro-batch of a rank.
    parallel = ParallelConfig.for_world(16, ep=8)
    micro_batches = TRAINING.global_batch // (parallel.dp * parallel.micro_batch)
    extra = UNFUSED_ROUTER_KERNELS * HOST_PASSES * host_us_per_kernel(CLUSTER) * 1e-6
    assert unfused - fused == pytest.approx(extra * MODEL.num_moe_layers * micro_batches, rel=1e-6)
    assert step_unfused > step_fused


def test_megatron_flag_and_its_release() -> None:
    model = load_model("mixtral-8x7b")
    assert "--moe-router-fusion" in megatron_args(mixtral_plan(), model)
    assert "--moe-router-fusion" not in megatron_args(mixtral_plan(moe_router_fusion=False), model)
    with pytest.raises(SpecError, match=r"moe_router_fusion \(True\) needs megatron_version 0.14"):
        megatron_args(mixtral_plan(), model, "0.13")
    assert "--moe-router-fusion" not in megatron_args(mixtral_plan(moe_router_fusion=False), model, "0.13")


def test_frameworks_without_te_routers_carry_it_off() -> None:
    fused = ParallelConfig.for_world(16, ep=8)
    unfused = fused.model_copy(update={"moe_router_fusion": False})
    assert not framework("megatron").rules(MODEL, TRAINING, fused)
    for name in ("torchtitan", "moeplan"):
        assert "moe_router_fusion" in {v.field for v in framework(name).rules(MODEL, TRAINING, fused)}
        assert "moe_router_fusion" not in {v.field for v in framework(name).rules(MODEL, TRAINING, unfused)}


def test_a_validation_file_may_state_it(tmp_path: Path) -> None:
    def eager(case: dict[str, Any]) -> bool:
        return not case["parallel"].get("cuda_graphs")

    unstated, stated = unstated_and_stated(tmp_path, "locked-moe.yaml", eager, {"moe_router_fusion": False})
    assert stated.estimate.step_time_s > unstated.estimate.step_time_s


def test_run_names_the_fusion_it_does_not_run(tmp_path: Path) -> None:
    path = tiny_plan_file(tmp_path, ParallelConfig.for_world(2, ep=2))
    request = build_run_request(RunAsk(plan_path=path))
    ignored = {entry.field: entry for entry in request.ignored}
    assert ignored["parallel.moe_router_fusion"].value is True
    assert request.options.parallel.moe_router_fusion is False


def test_an_fsdp2_plan_that_does_not_state_it_is_torchtitans() -> None:
    # Plans solved for torchtitan before the setting existed still launch there.
    stated = ParallelConfig.for_world(16, ep=8, distributed_optimizer=True, dp_sharding="fsdp2").model_dump()
    unstated = {k: v for k, v in stated.items() if k != "moe_router_fusion"}
    assert ParallelConfig.model_validate(unstated).moe_router_fusion is False
    assert ParallelConfig.model_validate({**unstated, "moe_router_fusion": True}).moe_router_fusion is True
    assert ParallelConfig.model_validate({**unstated, "dp_sharding": "megatron"}).moe_router_fusion is True
