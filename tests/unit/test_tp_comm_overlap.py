"""TP communication overlap as a plan setting (issue 17 item 2, ``ParallelConfig.tp_comm_overlap``): priced
(the sequence-parallel collectives hide behind their GEMMs, which lose the SMs Transformer Engine's
userbuffers take, and the userbuffers' memory is held), emitted (``--tp-comm-overlap``), refused where
Megatron-Core does not run it (rule 17) and by frameworks without it, offered by the search only when asked,
stated by validation files, and named by ``moeplan run``, whose runtime does not overlap."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from planner.accuracy.validate import validate_suite
from planner.accuracy.validation_file import load_validation_file
from planner.catalog import load_cluster, load_model
from planner.costmodel import estimate
from planner.costmodel.comm import ring_time
from planner.costmodel.geometry import group_geometry
from planner.costmodel.memory import TP_OVERLAP_BUFFERS_PER_ELEMENT
from planner.emit import megatron_args
from planner.errors import SpecError
from planner.feasibility import check_plan
from planner.frameworks import framework
from planner.overrides import apply_what_if
from planner.schema import MeshAxis, ParallelConfig, TrainingSpec
from planner.workflows.run_request import RunAsk, build_run_request
from tests.cli.invoke import invoke
from tests.unit.stated_cases import unstated_and_stated, write_pair
from tests.unit.test_emit import mixtral_plan
from tests.unit.test_overlap_grad_reduce import tiny_plan_file

MODEL = load_model("mixtral-8x7b")
CLUSTER = load_cluster("dgx-h100", num_nodes=4)
TRAINING = TrainingSpec(seq_len=4096, global_batch=256)


def _estimate(overlap: bool, training: TrainingSpec = TRAINING, **degrees: int):  # type: ignore[no-untyped-def]
    parallel = ParallelConfig.for_world(32, **{"tp": 4, "ep": 8, **degrees}, tp_comm_overlap=overlap)
    return estimate(MODEL, training, parallel, CLUSTER)


def _terms(result) -> dict[str, tuple[float, float]]:  # type: ignore[no-untyped-def]
    return {t.name: (t.total_s, t.exposed_s) for t in result.breakdown}


def test_the_same_collectives_hide_behind_the_gemms_which_lose_sms() -> None:
    off, on = _terms(_estimate(False)), _terms(_estimate(True))
    assert on["tp_comm"][0] == off["tp_comm"][0] > 0  # the same collectives and bytes
    assert 0 < on["tp_comm"][1] < off["tp_comm"][1] / 2  # most of them hidden; the last RS chunk is not
    assert "tp_overlap_sm_cost" not in off and on["tp_overlap_sm_cost"][1] > 0
    assert on["gemm"] == off["gemm"]
    # Without the overlap, only the backward re-gather (beside the column linear's data gradient) hides.
    assert off["tp_comm"][0] > off["tp_comm"][1] > 0.7 * off["tp_comm"][0]


def test_a_slow_tp_link_leaves_the_collectives_exposed_beyond_the_gemms() -> None:
    slow = apply_what_if(CLUSTER, [("intra_node_gbps", 5.0)])  # NVLink at 5 GB/s
    parallel = ParallelConfig.for_world(32, tp=4, ep=8, tp_comm_overlap=True)
    terms = _terms(estimate(MODEL, TRAINING, parallel, slow))
    total, exposed = terms["tp_comm"]
    assert exposed > 0.9 * total  # GEMMs far shorter than the collectives hide little


def test_userbuffers_are_held_in_memory() -> None:
    off, on = _estimate(False), _estimate(True)
    assert off.memory is not None and on.memory is not None
    rows = (
        TRAINING.seq_len * 1
    )  # micro-batch 1, cp 1: Megatron's userbuffer shape is (seq x mbs / cp, hidden)
    assert on.memory.tp_overlap_buffers == rows * MODEL.hidden_size * 24  # 12 BF16 buffers
    assert off.memory.tp_overlap_buffers == 0
    assert on.peak_memory_bytes == pytest.approx(off.peak_memory_bytes + on.memory.tp_overlap_buffers)
    fp8 = _estimate(True, TrainingSpec(seq_len=4096, global_batch=256, precision="fp8"), micro_batch=2)
    assert fp8.memory is not None
    assert (
        fp8.memory.tp_overlap_buffers == 2 * rows * MODEL.hidden_size * TP_OVERLAP_BUFFERS_PER_ELEMENT["fp8"]
    )


def test_rule_17_and_the_frameworks_without_it() -> None:
    def fields(model_name: str, **degrees: object) -> set[str]:
        parallel = ParallelConfig.for_world(32, **degrees, tp_comm_overlap=True)  # type: ignore[arg-type]
        return {v.field for v in check_plan(load_model(model_name), TRAINING, parallel, 32)}

    assert "tp_comm_overlap" not in fields("mixtral-8x7b", tp=4, ep=8)
    assert "tp_comm_overlap" in fields("mixtral-8x7b", tp=1, ep=8)
    assert "tp_comm_overlap" in fields("mixtral-8x7b", tp=4, ep=8, sequence_parallel=False)
    assert "tp_comm_overlap" in fields("deepseek-v2-lite", tp=2, ep=8)  # MLA
    parallel = ParallelConfig.for_world(32, tp=4, ep=8, tp_comm_overlap=True)
    assert not framework("megatron").rules(MODEL, TRAINING, parallel)
    for name in ("torchtitan", "moeplan"):
        assert "tp_comm_overlap" in {v.field for v in framework(name).rules(MODEL, TRAINING, parallel)}


def test_megatron_flag_follows_the_setting() -> None:
    assert "--tp-comm-overlap" not in megatron_args(mixtral_plan(), MODEL)
    assert "--tp-comm-overlap" in megatron_args(mixtral_plan(tp_comm_overlap=True), MODEL)


def test_solve_offers_it_only_when_asked_and_refuses_it_for_torchtitan() -> None:
    base = ("solve", "--model", "mixtral-8x7b", "--cluster", "dgx-h100", "--tp", "2", "--json")
    code, stdout, _ = invoke(*base)
    assert code == 0 and json.loads(stdout)["parallel"]["tp_comm_overlap"] is False
    code, stdout, _ = invoke(*base, "--tp-comm-overlap")
    assert code == 0
    plan = json.loads(stdout)
    assert plan["parallel"]["tp_comm_overlap"] is True  # priced faster here, so kept
    assert plan["estimate"]["memory"]["tp_overlap_buffers"] > 0
    code, _, stderr = invoke(*base, "--tp-comm-overlap", "--framework", "torchtitan")
    assert code == 2 and "--tp-comm-overlap has no torchtitan equivalent" in " ".join(stderr.split())


def test_a_validation_file_may_state_it(tmp_path: Path) -> None:
    def sequence_parallel(case: dict[str, Any]) -> bool:
        return bool(case["parallel"].get("sequence_parallel"))

    on = {"tp_comm_overlap": True}
    unstated, stated = unstated_and_stated(tmp_path, "korthikanti-table5.yaml", sequence_parallel, on)
    assert stated.estimate.step_time_s < unstated.estimate.step_time_s
    # A run that states it where Megatron refuses it (no sequence parallelism) cannot have run as stated.
    path = write_pair(
        tmp_path, "korthikanti-table5.yaml", sequence_parallel, on | {"sequence_parallel": False}
    )
    with pytest.raises(SpecError, match="tp_comm_overlap"):
        validate_suite(load_validation_file(path))


def test_run_names_the_overlap_it_does_not_run(tmp_path: Path) -> None:
    path = tiny_plan_file(tmp_path, ParallelConfig.for_world(2, tp=2, tp_comm_overlap=True))
    request = build_run_request(RunAsk(plan_path=path))
    ignored = {entry.field: entry for entry in request.ignored}
    assert ignored["parallel.tp_comm_overlap"].value is True
    assert request.options.parallel.tp_comm_overlap is False


def test_fp8_training_gathers_fp8_and_reduces_bf16() -> None:
    # Transformer Engine quantises before the sequence-parallel all-gathers (forward input, backward output
    # gradient and re-gathered input); the reduce-scatters move the GEMMs' BF16 outputs.
    parallel = ParallelConfig.for_world(32, tp=4, ep=8)
    geo = group_geometry(parallel, MeshAxis.TP, CLUSTER.num_gpus_per_node)
    elements = TRAINING.seq_len * MODEL.hidden_size  # a micro-batch's gathered activation
    rs = ring_time(CLUSTER, "reduce_scatter", 2 * elements, geo)
    for precision, per_element in (("fp8", 1 + 4 / 128), ("mxfp8", 1 + 1 / 32)):
        low = TrainingSpec(seq_len=4096, global_batch=256, precision=precision)
        ag = {width: ring_time(CLUSTER, "all_gather", width * elements, geo) for width in (2.0, per_element)}
        ratio = (3 * ag[per_element] + 2 * rs) / (3 * ag[2.0] + 2 * rs)
        fp8_terms, bf16_terms = _terms(_estimate(False, low)), _terms(_estimate(False))
        assert fp8_terms["tp_comm"][0] == pytest.approx(bf16_terms["tp_comm"][0] * ratio, rel=1e-9)
