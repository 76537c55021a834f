"""The moeplan-validation/1 loader, case conversion, nominal cluster profiles and ranking statistics."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from planner.accuracy.validation_file import (
    ValidationSuite,
    best_indices,
    case_inputs,
    cluster_from_nominal,
    kendall_tau,
    load_validation_file,
    mape,
    pairwise_agreement,
    signed_error,
    top1_match,
)
from planner.errors import SpecError
from planner.schema import DispatcherSpec, GpuSpec, PeakTflops
from tests.conftest import SHARED_VALIDATION

PUBLISHED = Path(__file__).resolve().parents[2].parent / "shared" / "validation" / "published.yaml"


@pytest.fixture(scope="module")
def suite(published: dict[str, Any]) -> ValidationSuite:
    """The published file, loaded (the ``published`` fixture skips when it is absent)."""
    return load_validation_file(PUBLISHED)


def _case(suite: ValidationSuite, case_id: str) -> Any:
    return next(case for case in suite.cases if case.id == case_id)


# ---------------------------------------------------------------- the published file


def test_every_published_case_converts(suite: ValidationSuite, published: dict[str, Any]) -> None:
    assert [case.id for case in suite.cases] == [case["id"] for case in published["cases"]]
    for case in suite.cases:
        inputs = case_inputs(suite, case)
        p = inputs.parallel
        assert inputs.num_gpus == case.num_gpus == inputs.cluster.world_size, case.id
        # Every published layout fills the world exactly, dense and expert side (parallel folding).
        assert p.dp * p.tp * p.cp * p.pp == case.num_gpus, case.id
        assert p.edp * p.ep * p.etp * p.pp == case.num_gpus, case.id


def test_names_come_from_mapping_keys(suite: ValidationSuite) -> None:
    assert suite.gpus["H100-SXM"].name == "H100-SXM"
    assert suite.models["qwen3-235b-a22b"].name == "qwen3-235b-a22b"
    assert suite.models["deepseek-v3-mtp"].mtp_num_layers == 1


def test_qwen235_row1_by_hand(suite: ValidationSuite) -> None:
    inputs = case_inputs(suite, _case(suite, "MZ-Q235-H100-1"))
    p = inputs.parallel
    assert (p.tp, p.pp, p.vpp, p.cp, p.ep, p.etp) == (2, 8, 4, 1, 32, 1)
    assert p.dp == 256 // (2 * 8)  # 16
    assert p.edp == 256 // (32 * 8)  # 1
    assert p.dispatcher == DispatcherSpec(kind="hierarchical", backend="deepep")
    assert (p.recompute, p.recompute_modules) == ("selective", ("layernorm", "moe_act"))
    assert p.sequence_parallel and p.distributed_optimizer and not p.fsdp and not p.a2a_overlap
    assert inputs.training.routing == "dropless"  # null in the file
    assert inputs.training.global_batch == 2048 and inputs.training.precision == "bf16"
    cluster = inputs.cluster
    assert (cluster.num_nodes, cluster.num_gpus_per_node) == (32, 8)
    assert cluster.gpu.name == "H100-SXM"
    intra, inter = cluster.links["intra_node"], cluster.links["inter_node"]
    assert intra.collectives["all_to_all"].bandwidth_gbps == pytest.approx(0.82 * 450)  # ~370
    assert intra.collectives["all_reduce"].bandwidth_gbps == pytest.approx(480)
    assert intra.collectives["all_gather"].latency_us == 10
    assert inter.collectives["all_to_all"].bandwidth_gbps == pytest.approx(48)
    assert inter.collectives["send_recv"].latency_us == 47
    assert cluster.provenance.kind == "published"
    assert cluster.provenance.source == suite.clusters["mz-h100"].source


def test_gb200_256_gpus_are_four_domains_of_64(suite: ValidationSuite) -> None:
    inputs = case_inputs(suite, _case(suite, "MB-2608-Q235-GB200"))
    cluster = inputs.cluster
    assert (cluster.num_nodes, cluster.num_gpus_per_node) == (4, 64)
    assert cluster.description is not None and "4 domains of 64" in cluster.description
    assert cluster.links["intra_node"].collectives["all_reduce"].bandwidth_gbps == pytest.approx(960)
    assert inputs.parallel.dispatcher == DispatcherSpec(kind="hierarchical", backend="hybridep")
    assert inputs.training.precision == "mxfp8"
    assert not inputs.parallel.sequence_parallel  # tp 1, stated false


def test_h100_8_with_8_gpus_is_one_node_and_nulls_take_defaults(suite: ValidationSuite) -> None:
    inputs = case_inputs(suite, _case(suite, "MB-MOON-RC-NONE"))
    assert (inputs.cluster.num_nodes, inputs.cluster.num_gpus_per_node) == (1, 8)
    p = inputs.parallel
    assert p.dispatcher == DispatcherSpec(kind="alltoall")  # dispatcher: null
    assert p.a2a_overlap is False  # a2a_overlap: null
    assert (p.dp, p.edp) == (4, 1)


def test_null_degrees_and_recompute(suite: ValidationSuite) -> None:
    mix7 = case_inputs(suite, _case(suite, "MLM-README-MIX7")).parallel  # cp, recompute null
    assert (mix7.cp, mix7.recompute, mix7.recompute_modules) == (1, "none", ())
    dsv3 = case_inputs(suite, _case(suite, "DSV3-REPORT-THROUGHPUT")).parallel  # vpp null (DualPipe)
    assert (dsv3.vpp, dsv3.dp, dsv3.edp) == (1, 128, 2)
    bf16 = case_inputs(suite, _case(suite, "MB-2511-DSV3-GB200-BF16")).parallel
    assert (bf16.recompute, bf16.dispatcher.kind, bf16.a2a_overlap) == ("none", "alltoall", False)
    capacity = case_inputs(suite, _case(suite, "MZ-MIX22-DROP")).training
    assert (capacity.routing, capacity.capacity_factor) == ("capacity", 1.0)


# ---------------------------------------------------------------- small files, good and bad


def _minimal() -> dict[str, Any]:
    return {
        "format": "moeplan-validation/1",
        "gpus": {
            "G": {"peak_tflops": {"bf16": 1000, "fp8": 2000}, "hbm_gib": 80, "hbm_gbps": 3000, "source": "s"}
        },
        "clusters": {
            "c8": {
                "gpu": "G",
                "gpus_per_node": 8,
                "intra_node_gbps": 450,
                "inter_node_gbps": 50,
                "source": "s",
            }
        },
        "models": {
            "moe": {
                "num_layers": 4,
                "hidden_size": 256,
                "num_attention_heads": 4,
                "ffn_hidden_size": 512,
                "num_experts": 8,
                "moe_router_topk": 2,
                "vocab_size": 1000,
            },
            "dense": {
                "num_layers": 4,
                "hidden_size": 256,
                "num_attention_heads": 4,
                "ffn_hidden_size": 512,
                "vocab_size": 1000,
            },
        },
        "cases": [
            {
                "id": "A",
                "group": "g",
                "source": "s",
                "cluster": "c8",
                "num_gpus": 16,
                "model": "moe",
                "training": {"seq_len": 1024, "global_batch": 32, "precision": "bf16"},
                "parallel": {"tp": 2, "ep": 8},
                "measured": {"metric": "step_time_s", "value": 1.5},
            }
        ],
    }


def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_minimal_file_loads_with_defaults(tmp_path: Path) -> None:
    suite = load_validation_file(_write(tmp_path, _minimal()))
    p = case_inputs(suite, suite.cases[0]).parallel
    # etp null: Megatron-LM's default, the TP degree (so edp = 16 / (2 x 8) = 1).
    assert (p.tp, p.pp, p.ep, p.etp, p.dp, p.edp, p.micro_batch) == (2, 1, 8, 2, 8, 1, 1)
    assert p.sequence_parallel  # null with tp 2
    assert p.dispatcher.kind == "alltoall"


def test_a_null_etp_is_tp_unless_megatron_would_refuse_it(tmp_path: Path) -> None:
    data = _minimal()
    data["models"]["moe"]["num_experts"] = 16
    data["cases"][0]["parallel"] |= {"ep": 16}  # tp 2 x ep 16 does not divide 16 GPUs: Megatron refuses it
    suite = load_validation_file(_write(tmp_path, data))
    assert case_inputs(suite, suite.cases[0]).parallel.etp == 1


def test_dense_model_gets_alltoall_and_no_sequence_parallel_at_tp1(tmp_path: Path) -> None:
    data = _minimal()
    data["cases"][0] |= {"model": "dense", "parallel": {"dispatcher": "deepep"}}
    suite = load_validation_file(_write(tmp_path, data))
    p = case_inputs(suite, suite.cases[0]).parallel
    assert p.dispatcher == DispatcherSpec()
    assert not p.sequence_parallel and p.dp == 16


def test_modules_without_granularity_mean_selective(tmp_path: Path) -> None:
    data = _minimal()
    data["cases"][0]["parallel"] |= {"recompute_modules": ["moe_act"]}
    suite = load_validation_file(_write(tmp_path, data))
    p = case_inputs(suite, suite.cases[0]).parallel
    assert (p.recompute, p.recompute_modules) == ("selective", ("moe_act",))


def test_fp8_param_gather_stated_null_or_lightest(tmp_path: Path) -> None:
    """Null is Megatron-LM's default (off); the lightest reading turns it on where the precision allows."""
    data = _minimal()
    data["cases"][0]["training"]["precision"] = "fp8"
    suite = load_validation_file(_write(tmp_path, data))
    assert not case_inputs(suite, suite.cases[0]).parallel.fp8_param_gather
    assert case_inputs(suite, suite.cases[0], lightest=True).parallel.fp8_param_gather
    data["cases"][0]["parallel"]["fp8_param_gather"] = False
    suite = load_validation_file(_write(tmp_path, data))
    assert not case_inputs(suite, suite.cases[0], lightest=True).parallel.fp8_param_gather
    data["cases"][0]["training"]["precision"] = "bf16"
    data["cases"][0]["parallel"].pop("fp8_param_gather")
    suite = load_validation_file(_write(tmp_path, data))
    assert not case_inputs(suite, suite.cases[0], lightest=True).parallel.fp8_param_gather


def test_cuda_graphs_stated_or_null(tmp_path: Path) -> None:
    """Null is Megatron-LM's default (no graphs); stated scopes are priced, in Megatron-Core's order."""
    data = _minimal()
    suite = load_validation_file(_write(tmp_path, data))
    assert case_inputs(suite, suite.cases[0]).parallel.cuda_graphs == ()
    data["cases"][0]["parallel"]["cuda_graphs"] = ["moe_router", "attn"]
    suite = load_validation_file(_write(tmp_path, data))
    assert case_inputs(suite, suite.cases[0]).parallel.cuda_graphs == ("attn", "moe_router")


def _break(change: Any) -> dict[str, Any]:
    data = _minimal()
    change(data)
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_break(lambda d: d["cases"][0].update(cluster="nope")), r"case 'A' field `cluster` \('nope'\)"),
        (
            _break(lambda d: d["cases"][0].update(model="mo")),
            r"case 'A' field `model` \('mo'\).*did you mean",
        ),
        (_break(lambda d: d["clusters"]["c8"].update(gpu="H100")), r"cluster 'c8' field `gpu` \('H100'\)"),
        (
            _break(lambda d: d["cases"][0]["parallel"].update(tpp=2)),
            r"case 'A' is invalid: field `parallel.tpp`",
        ),
        (
            _break(lambda d: d["cases"][0].update(extra=1)),
            r"case 'A' is invalid: field `extra`.*unknown field",
        ),
        (
            _break(lambda d: d.update(format="moeplan-validation/2")),
            r"field `format` \('moeplan-validation/2'\)",
        ),
        (_break(lambda d: d.update(cluster={})), r"field `cluster`.*unknown field.*did you mean `clusters`"),
        (_break(lambda d: d.pop("models")), r"field `models` is required but missing"),
        (
            _break(lambda d: d["cases"][0]["parallel"].update(recompute_modules=["attn"])),
            r"case 'A' is invalid: field `parallel.recompute_modules` .*unknown module 'attn'",
        ),
        (
            _break(lambda d: d["cases"][0]["parallel"].update(dispatcher="flex")),
            r"case 'A' is invalid: field `parallel.dispatcher` \('flex'\)",
        ),
        (
            _break(lambda d: d["cases"][0].update(measured={"metric": "mfu", "value": None})),
            r"case 'A' is invalid: field `measured`.*outcome must be given",
        ),
        (_break(lambda d: d["cases"].append(dict(d["cases"][0]))), r"case 'A' field `id`.*earlier case"),
        (_break(lambda d: d["gpus"]["G"].pop("hbm_gib")), r"gpu 'G' is invalid: field `hbm_gib` is required"),
        (_break(lambda d: d["cases"][0].pop("id")), r"case '#1' is invalid: field `id` is required"),
        (
            _break(lambda d: d["cases"][0]["parallel"].update(fp8_param_gather=True)),
            r"case 'A' is invalid.*fp8_param_gather is true, so training.precision must be fp8 or mxfp8, not bf16",
        ),
        (
            _break(lambda d: d["cases"][0]["parallel"].update(cuda_graphs=["moe"])),
            r"case 'A' is invalid: field `parallel.cuda_graphs",
        ),
    ],
)
def test_malformed_files(tmp_path: Path, data: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        load_validation_file(_write(tmp_path, data))


def test_measured_oom_needs_no_value(tmp_path: Path) -> None:
    data = _break(lambda d: d["cases"][0].update(measured={"metric": "mfu", "value": None, "outcome": "oom"}))
    suite = load_validation_file(_write(tmp_path, data))
    assert suite.cases[0].measured.outcome == "oom"


@pytest.mark.parametrize(
    ("parallel", "training", "message"),
    [
        (
            {"recompute": "full", "recompute_modules": ["moe_act"]},
            {},
            r"case 'A' parallel is invalid.*selective",
        ),
        ({}, {"routing": "capacity"}, r"case 'A' training is invalid.*capacity_factor must be given"),
    ],
)
def test_case_rules_are_spec_errors_naming_the_case(
    tmp_path: Path, parallel: dict[str, Any], training: dict[str, Any], message: str
) -> None:
    data = _minimal()
    data["cases"][0]["parallel"] |= parallel
    data["cases"][0]["training"] |= training
    suite = load_validation_file(_write(tmp_path, data))
    with pytest.raises(SpecError, match=message):
        case_inputs(suite, suite.cases[0])


# ---------------------------------------------------------------- nominal clusters


def _gpu() -> GpuSpec:
    return GpuSpec(name="G", peak_tflops=PeakTflops(bf16=1000), hbm_gib=80, hbm_gbps=3000, source="s")


@pytest.mark.parametrize(
    ("per_node", "num_gpus", "shape", "remodelled"),
    [
        (8, 16, (2, 8), False),
        (72, 8, (1, 8), False),
        (8, 8, (1, 8), False),
        (72, 256, (4, 64), True),
        (72, 144, (2, 72), False),
    ],
)
def test_cluster_from_nominal_shapes(
    per_node: int, num_gpus: int, shape: tuple[int, int], remodelled: bool
) -> None:
    cluster = cluster_from_nominal("c", _gpu(), per_node, num_gpus, 900, 50, "src")
    assert (cluster.num_nodes, cluster.num_gpus_per_node) == shape
    assert cluster.description is not None
    assert ("do not fill whole" in cluster.description) is remodelled
    assert cluster.links["intra_node"].source == "src" and cluster.provenance.source == "src"


@pytest.mark.parametrize(
    ("capability", "nvls"), [("8.0", False), ("9.0", True), ("10.0", True), (None, True)]
)
def test_nvlink_sharp_all_reduce_only_from_hopper_on(capability: str | None, nvls: bool) -> None:
    """NVLS needs third-generation NVSwitch: an A100's all_reduce is a ring (issue 17 item 3); a GPU whose
    capability the file does not state keeps nccl-tests' H100 figure."""
    gpu = _gpu().model_copy(update={"compute_capability": capability})
    links = cluster_from_nominal("c", gpu, 8, 16, 300, 25, "src").links["intra_node"].collectives
    expected = 480 / 450 * 300 if nvls else 0.82 * 300
    assert links["all_reduce"].bandwidth_gbps == pytest.approx(expected)
    assert links["all_gather"].bandwidth_gbps == pytest.approx(0.82 * 300)


# ---------------------------------------------------------------- statistics


def test_kendall_tau_without_ties() -> None:
    assert kendall_tau([1, 2, 3], [1, 2, 3]) == 1.0
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    # Pairs of [1, 2, 3] vs [1, 3, 2]: (0,1) C, (0,2) C, (1,2) D -> (2 - 1) / 3.
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)


def test_kendall_tau_b_with_ties() -> None:
    # xs [1, 2, 2, 3] vs ys [1, 3, 2, 4]: of 6 pairs, (1,2) is tied in x, the other 5 concordant.
    # tau_b = (5 - 0) / sqrt((6 - 1) * (6 - 0)) = 5 / sqrt(30) = 0.91287...
    assert kendall_tau([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(5 / math.sqrt(30))
    # xs [1, 2, 3, 4] vs ys [1, 1, 2, 1]: (0,1) (0,3) (1,3) tied in y; (0,2) (1,2) C; (2,3) D.
    # tau_b = (2 - 1) / sqrt((6 - 0) * (6 - 3)) = 1 / sqrt(18) = 0.23570...
    assert kendall_tau([1, 2, 3, 4], [1, 1, 2, 1]) == pytest.approx(1 / math.sqrt(18))


def test_kendall_tau_undefined_and_bad_input() -> None:
    assert math.isnan(kendall_tau([], []))
    assert math.isnan(kendall_tau([1.0], [2.0]))
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))  # every x tied
    with pytest.raises(ValueError, match="equal length"):
        kendall_tau([1, 2], [1])


def test_pairwise_agreement_counts_measured_orderings() -> None:
    assert pairwise_agreement([1, 2, 3], [1, 2, 3]) == (3.0, 3)
    assert pairwise_agreement([1, 2, 3], [3, 2, 1]) == (0.0, 3)
    # measured [1, 1, 2]: the tied pair is not compared; predicted [5, 4, 4] ties the pair (1, 2): half.
    assert pairwise_agreement([5, 4, 4], [1, 1, 2]) == (0.5, 2)
    with pytest.raises(ValueError, match="equal length"):
        pairwise_agreement([1, 2], [1])


def test_validate_reports_ranking_first(published: dict[str, Any]) -> None:
    from planner.accuracy.validate import validate_suite

    report = validate_suite(load_validation_file(SHARED_VALIDATION))
    first, ranked = report.top1_groups
    assert ranked == len(report.groups) and 0 <= first <= ranked
    pairs = sum(g.pairs for g in report.groups)
    assert pairs > 0 and 0.0 <= report.pairwise_accuracy <= 1.0
    # The overall share is the pooled one, not a mean of the groups' shares.
    assert report.pairwise_accuracy == pytest.approx(sum(g.pairs_right for g in report.groups) / pairs)


def test_best_indices_keep_ties_and_direction() -> None:
    assert best_indices([3.0, 1.0, 1.0, 2.0], "step_time_s") == {1, 2}
    assert best_indices([3.0, 1.0, 3.0], "model_tflops_per_gpu") == {0, 2}
    assert best_indices([0.4, 0.5], "mfu") == {1}
    assert best_indices([100.0, 200.0], "tokens_per_s_per_gpu") == {1}
    assert best_indices([None, 5.0, math.nan], "step_time_s") == {1}  # no value (oom) is never best
    assert best_indices([0.1 + 0.2, 0.3], "step_time_s") == {0, 1}  # float noise is a tie
    assert best_indices([], "mfu") == set()


def test_top1_match() -> None:
    measured = [17.6, 19.7, 17.6]  # two measured-best rows, as MZ-Q235-H100 rows 2 and 3
    assert top1_match([10.0, 12.0, 11.0], measured, "step_time_s")
    assert top1_match([11.0, 12.0, 10.0], measured, "step_time_s")
    assert not top1_match([12.0, 10.0, 11.0], measured, "step_time_s")
    assert top1_match([1.0, 2.0], [300.0, 320.0], "model_tflops_per_gpu")
    assert not top1_match([2.0, 1.0], [300.0, 320.0], "model_tflops_per_gpu")
    assert not top1_match([1.0, 2.0], [None, None], "mfu")
    # A predicted tie counts only when every case tied best was measured best.
    assert not top1_match([10.0, 10.0, 11.0], measured, "step_time_s")
    assert top1_match([10.0, 12.0, 10.0], measured, "step_time_s")
    with pytest.raises(ValueError, match="equal length"):
        top1_match([1.0], [1.0, 2.0], "mfu")


def test_signed_error_and_mape() -> None:
    assert signed_error(110.0, 100.0) == pytest.approx(0.1)
    assert signed_error(90.0, 100.0) == pytest.approx(-0.1)
    assert mape([0.1, -0.3]) == pytest.approx(0.2)
    assert math.isnan(mape([]))
    with pytest.raises(ValueError, match="non-zero"):
        signed_error(1.0, 0.0)


@pytest.mark.parametrize(
    ("parallel", "training", "rule"),
    [
        ({"tp": 3}, {}, r"tp \(3\) must divide num_attention_heads \(4\)"),
        ({"ep": 3}, {}, r"ep \(3\) must divide num_experts \(8\)"),
        ({"tp": 1, "cp": 3}, {}, r"seq_len \(1024\) must be divisible by 2 x cp \(6\)"),
        ({}, {"global_batch": 12}, r"global_batch \(12\) must be divisible by micro_batch x dp \(1 x 8\)"),
    ],
)
def test_a_case_that_cannot_have_run_is_refused(
    tmp_path: Path, parallel: dict[str, Any], training: dict[str, Any], rule: str
) -> None:
    data = _minimal()
    data["cases"][0]["parallel"] |= parallel
    data["cases"][0]["training"] |= training
    suite = load_validation_file(_write(tmp_path, data))
    with pytest.raises(SpecError, match=rf"case 'A' cannot have run as stated: .*{rule}"):
        case_inputs(suite, suite.cases[0])
