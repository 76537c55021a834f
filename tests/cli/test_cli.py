"""The command line as a user runs it: outputs, JSON shapes, exit codes, error paragraphs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

from planner import __version__
from planner.catalog import catalog_names, cluster_names
from planner.cli import app
from tests.cli.invoke import invoke


def test_version() -> None:
    assert invoke("--version") == (0, f"moeplan {__version__}\n", "")


def test_models_json_lists_every_catalog_model() -> None:
    code, stdout, _ = invoke("models", "--json")
    assert code == 0
    rows = json.loads(stdout)
    assert [r["name"] for r in rows] == catalog_names()
    mixtral = next(r for r in rows if r["name"] == "mixtral-8x7b")
    assert mixtral["total_params"] == pytest.approx(46.7e9, rel=0.02)
    assert mixtral["active_params"] == pytest.approx(12.9e9, rel=0.05)


def test_models_table() -> None:
    code, stdout, _ = invoke("models")
    assert code == 0 and "2x70B" in stdout and "46.7B" in stdout


def test_clusters_json() -> None:
    code, stdout, _ = invoke("clusters", "--json")
    rows = {r["name"]: r for r in json.loads(stdout)}
    assert code == 0 and sorted(rows) == cluster_names()
    assert (rows["h800-dsv3"]["num_nodes"], rows["h800-dsv3"]["num_gpus"]) == (256, 2048)


def test_show_model_json_round_trips(tmp_path: Path) -> None:
    code, stdout, _ = invoke("show", "model", "deepseek-v3", "--json")
    data = json.loads(stdout)
    assert code == 0 and data["mtp_params"] > 0
    spec_file = tmp_path / "dsv3.json"
    spec_file.write_text(json.dumps(data["spec"]))
    code, again, _ = invoke("show", "model", str(spec_file), "--json")
    assert code == 0 and json.loads(again)["spec"] == data["spec"]


def test_show_cluster_with_nodes_and_topology() -> None:
    code, stdout, _ = invoke("show", "cluster", "dgx-h100", "--nodes", "2", "--json", "--topology")
    data = json.loads(stdout)
    assert code == 0 and data["num_nodes"] == 2
    gpus = [n for n in data["topology"]["nodes"] if n["kind"] == "gpu"]
    assert len(gpus) == 16


def test_show_cluster_table() -> None:
    code, stdout, _ = invoke("show", "cluster", "a800-2x8")
    assert (
        code == 0 and "all_to_all" in stdout and "nccl/issues/412" not in stdout
    )  # sources stay in the file


def test_show_gpu() -> None:
    code, stdout, _ = invoke("show", "gpu", "h800-sxm")
    assert code == 0 and json.loads(stdout)["scale_up_gbps"] == 200


@pytest.mark.parametrize("which", ["all", "model", "gpu", "cluster", "training", "plan"])
def test_schema(which: str) -> None:
    code, stdout, _ = invoke("schema", which)
    schema = json.loads(stdout)
    assert code == 0
    if which == "model":
        assert "Routed experts per MoE layer" in schema["properties"]["num_experts"]["description"]


def test_output_is_deterministic() -> None:
    assert invoke("models", "--json") == invoke("models", "--json")


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["show", "model", "mixtral-8x7"], "did you mean 'mixtral-8x7b'"),
        (["show", "cluster", "dgx-h10"], "did you mean 'dgx-h100'"),
        (["show", "cluster", "a800-2x8", "--nodes", "0"], "must be at least 1"),
        (["show", "gpu", "H900"], "not in the hardware catalog"),
        (["show", "model", "/nonexistent/m.yaml"], "does not exist"),
    ],
)
def test_user_errors_exit_2_with_one_paragraph(args: list[str], phrase: str) -> None:
    code, stdout, stderr = invoke(*args)
    assert code == 2 and stdout == ""
    assert phrase in " ".join(stderr.replace("│", " ").split())
    assert "Traceback" not in stderr


def test_bad_option_exits_2() -> None:
    code, _, stderr = invoke("schema", "nonsense")
    assert code == 2 and "Traceback" not in stderr


def _commands(group: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every (sub)command of a click group (typer vendors its own click, so duck-typed)."""
    found: dict[tuple[str, ...], Any] = {}
    for name, command in group.commands.items():
        found[(*prefix, name)] = command
        if hasattr(command, "commands"):
            found.update(_commands(command, (*prefix, name)))
    return found


COMMANDS = _commands(typer.main.get_command(app))

# The option set of every command, pinned so that growth is deliberate (torchtitan's frozen-CLI test).
FROZEN_OPTIONS = {
    ("models",): {"--json"},
    ("clusters",): {"--json"},
    ("show",): set(),
    ("show", "model"): {"--json"},
    ("show", "cluster"): {"--nodes", "--topology", "--json"},
    ("show", "gpu"): set(),
    ("schema",): set(),
    ("estimate",): {
        "--model", "--plan", "--set", "--cluster", "--nodes", "--tp", "--pp", "--vpp", "--cp", "--ep", "--etp", "--mbs", "--gbs",
        "--seq-len", "--recompute", "--recompute-modules", "--dispatcher", "--precision", "--no-sequence-parallel",
        "--routing", "--capacity-factor", "--a2a-chunks", "--a2a-overlap", "--topology-aware-routing", "--condense",
        "--sequence-migration", "--layers-per-stage", "--json",
    },
    ("validate",): {"--solve", "--json"},
    ("solve",): {
        "--model", "--cluster", "--nodes", "--seq-len", "--gbs", "--precision", "--routing", "--capacity-factor",
        "--dispatcher", "--topology-aware-routing", "--condense", "--sequence-migration", "--framework", "--time-limit",
        "--gap", "--exhaustive", "--top-k", "-o", "--output", "--emit", "--what-if", "--json",
        "--tp", "--pp", "--vpp", "--cp", "--ep", "--etp", "--mbs", "--max-tp", "--max-pp", "--max-vpp", "--max-cp",
        "--max-ep", "--max-etp", "--max-mbs", "--recompute", "--memory-margin", "--main-grads-dtype", "--exp-avg-dtype",
        "--optimizer-offload", "--fp8-param-gather", "--cuda-graphs", "--tp-comm-overlap",
    },
    ("emit",): {"--plan", "--format", "--megatron-version", "--launch", "--partition", "--account", "--time",
                "--job-name", "--cpus-per-task", "--slurm-output", "--slurm-error"},
    ("check",): {"--update", "--junit-xml", "--json"},
    ("plot",): {"-o", "--output", "--plan", "--model", "--cluster", "--nodes", "--seq-len", "--gbs", "--precision", "--top"},
    ("calibrate",): {"--runs", "--cluster", "-o", "--output", "--held-out", "--json"},
    ("probe",): {"--nproc", "--backend", "--testbed", "--budget", "-o", "--output", "--name", "--gpu", "--json"},
    ("run",): {
        "--plan", "--model", "--nproc", "--testbed", "--ranks-per-node", "--tp", "--sequence-parallel", "--pp", "--vpp", "--ep", "--etp", "--cp", "--mbs",
        "--dispatcher", "--a2a-chunks", "--condense-threshold", "--topology-aware-routing", "--sequence-migration", "--set", "--strict", "--steps", "--seed", "--seq-len", "--gbs", "--cluster",
        "--checkpoint-dir", "--checkpoint-every", "--keep-checkpoints", "--resume", "--timeout", "-o", "--output", "--backend", "--json",
    },
    ("testbed",): set(),
    ("testbed", "up"): {"--nodes", "--ranks-per-node", "--inter-node-mbit", "--inter-node-delay-ms", "--json"},
    ("testbed", "down"): {"--json"},
    ("testbed", "status"): {"--json"},
}  # fmt: skip


def test_command_options_are_frozen() -> None:
    options = {
        path: {opt for p in cmd.params if p.param_type_name == "option" for opt in p.opts} - {"--help"}
        for path, cmd in COMMANDS.items()
    }
    assert options == FROZEN_OPTIONS


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_help_for_every_command(path: tuple[str, ...]) -> None:
    code, stdout, _ = invoke(*path, "--help")
    assert code == 0 and "Usage" in stdout


ESTIMATE_KEYS = {
    "step_time_s",
    "tokens_per_s_per_gpu",
    "model_tflops_per_gpu",
    "mfu",
    "peak_memory_bytes",
    "fits",
}


def test_estimate_json() -> None:
    code, stdout, _ = invoke(
        "estimate", "--model", "mixtral-8x7b", "--cluster", "dgx-h100", "--tp", "2", "--pp", "2", "--ep", "8",
        "--gbs", "256", "--dispatcher", "deepep", "--json",
    )  # fmt: skip
    data = json.loads(stdout)
    assert code == 0 and ESTIMATE_KEYS <= set(data["estimate"])
    assert data["parallel"]["dispatcher"] == {
        "kind": "hierarchical", "backend": "deepep", "num_sms": None, "num_chunks": 1,
        "topology_aware_routing": False,
        "condense_fraction": 0.0, "sequence_migration": False,
    }  # fmt: skip
    names = {term["name"] for term in data["estimate"]["breakdown"]}
    assert {"gemm", "tp_comm", "ep_dispatch_combine", "pipeline_bubble", "dp_grad_reduce"} <= names
    assert set(data["estimate"]["bytes_per_link_class"]) == {"inter_node", "intra_node"}


def test_estimate_table() -> None:
    code, stdout, _ = invoke("estimate", "--model", "tiny-moe", "--ep", "8", "--gbs", "32")
    assert code == 0 and "step" in stdout and "ep_dispatch_combine" in stdout


def test_estimate_prices_deepspeed_layouts_with_a_warning() -> None:
    code, stdout, stderr = invoke(
        "estimate", "--model", "2x70B", "--tp", "8", "--etp", "8", "--ep", "2", "--gbs", "16", "--seq-len", "8192",
        "--no-sequence-parallel", "--dispatcher", "monta", "--a2a-chunks", "4", "--json",
    )  # fmt: skip
    assert code == 0 and "Megatron-LM" in stderr and json.loads(stdout)["estimate"]["step_time_s"] > 0


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--ep", "3"], "ep (3) must divide num_experts (8)"),
        (["--tp", "3"], "tp*cp*pp*dp"),
        (["--dispatcher", "monta", "--a2a-chunks", "0"], "num_chunks"),
        (["--condense", "1.5"], "condense_fraction"),
        (["--routing", "capacity"], "capacity_factor must be given"),
    ],
)
def test_estimate_rejects_bad_configurations(args: list[str], phrase: str) -> None:
    code, stdout, stderr = invoke("estimate", "--model", "mixtral-8x7b", *args)
    assert code == 2 and stdout == "" and "Traceback" not in stderr
    assert phrase in " ".join(stderr.replace("│", " ").split())


def test_validate_json_on_the_published_file(published: dict[str, Any]) -> None:
    from tests.conftest import SHARED_VALIDATION

    code, stdout, _ = invoke("validate", str(SHARED_VALIDATION), "--json")
    data = json.loads(stdout)
    assert code == 0 and len(data["cases"]) == len(published["cases"])
    assert {"id", "predicted", "measured", "error", "fits"} <= set(data["cases"][0])
    assert all({"group", "kendall_tau", "top1_match"} <= set(g) for g in data["groups"])
    assert isinstance(data["mape"], float)


def test_validate_rejects_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "v.yaml"
    bad.write_text("format: moeplan-validation/2\n")
    code, _, stderr = invoke("validate", str(bad))
    assert code == 2 and "format" in stderr


SMALL_VALIDATION = """
format: moeplan-validation/1
gpus:
  H100-SXM: {peak_tflops: {bf16: 989.5, fp8: 1979}, hbm_gib: 80, hbm_gbps: 3350, source: "datasheet"}
clusters:
  two-nodes: {gpu: H100-SXM, gpus_per_node: 8, intra_node_gbps: 450, inter_node_gbps: 50, source: "spec"}
models:
  mix: {num_layers: 32, hidden_size: 4096, num_attention_heads: 32, num_query_groups: 8, kv_channels: 128,
        attention: gqa, mla: null, ffn_hidden_size: 14336, num_experts: 8, moe_ffn_hidden_size: 14336,
        moe_router_topk: 2, shared_expert_ffn_hidden_size: 0, first_k_dense_layers: 0, vocab_size: 32000,
        gated_linear_unit: true, source: "Mixtral-8x7B dimensions"}
cases:
  - {id: A, group: G, source: s, cluster: two-nodes, num_gpus: 16, model: mix,
     training: {seq_len: 4096, global_batch: 64, micro_batch: 1, precision: bf16, routing: balanced},
     parallel: {tp: 1, pp: 2, vpp: null, cp: 1, ep: 8, etp: 1, sequence_parallel: false, recompute: full,
                recompute_modules: [], dispatcher: alltoall, a2a_overlap: false, distributed_optimizer: true},
     measured: {metric: step_time_s, value: 3.0}}
  - {id: B, group: G, source: s, cluster: two-nodes, num_gpus: 16, model: mix,
     training: {seq_len: 4096, global_batch: 64, micro_batch: 1, precision: bf16, routing: balanced},
     parallel: {tp: 2, pp: 2, vpp: null, cp: 1, ep: 4, etp: 1, sequence_parallel: true, recompute: full,
                recompute_modules: [], dispatcher: alltoall, a2a_overlap: false, distributed_optimizer: true},
     measured: {metric: step_time_s, value: 4.0}}
"""


def test_validate_solve_is_never_predicted_slower_than_the_best_measured(tmp_path: Path) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(SMALL_VALIDATION)
    code, stdout, _ = invoke("validate", str(path), "--solve", "--json")
    group = json.loads(stdout)["groups"][0]
    assert code == 0 and group["group"] == "G" and group["top1_match"] is not None
    assert {"solver_plan", "solver_predicted", "best_measured_predicted"} <= set(group)
    assert group["best_measured_fits"]
    assert group["solver_predicted"] <= group["best_measured_predicted"] * (1 + 1e-9)


def test_solve_json_matches_the_written_plan(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    args = ["solve", "--model", "tiny-moe", "--cluster", "a800-2x8", "--nodes", "1", "--gbs", "32"]
    code, stdout, _ = invoke(*args, "-o", str(out), "--json")
    assert code == 0 and stdout == out.read_text()
    plan = json.loads(stdout)
    assert plan["schema_version"] == 3 and plan["solver"]["optimal"] is True
    # The plan records its node shape and where its inputs came from (bundled: by name).
    assert (plan["num_nodes"], plan["num_gpus_per_node"], plan["num_gpus"]) == (1, 8, 8)
    assert plan["cluster"] == {"name": "a800-2x8", "source": "bundled", "path": None, "sha256": None}
    assert {"tp", "pp", "vpp", "cp", "ep", "etp", "dp", "edp", "micro_batch"} <= set(plan["parallel"])
    again = invoke(*args, "--json")[1]
    strip = lambda text: {k: v for k, v in json.loads(text).items() if k != "solver"}  # noqa: E731
    assert strip(again) == strip(stdout)


def test_solve_emits_and_emit_reads_the_plan(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    code, stdout, _ = invoke(
        "solve", "--model", "mixtral-8x7b", "--cluster", "dgx-h100", "--nodes", "2", "--gbs", "64",
        "-o", str(out), "--emit", "megatron",
    )  # fmt: skip
    assert code == 0 and "MEGATRON_ARGS=(" in stdout
    for fmt, marker in (("torchrun", "torchrun"), ("slurm", "#SBATCH"), ("plan-json", '"schema_version": 3')):
        code, text, _ = invoke("emit", "--plan", str(out), "--format", fmt)
        assert code == 0 and marker in text
    # torchtitan has no EP all-to-all overlap outside DualPipeV, nor Megatron's sharding: a clear refusal, not a wrong config
    code, text, stderr = invoke("emit", "--plan", str(out), "--format", "torchtitan")
    said = " ".join(stderr.replace("│", " ").split())
    assert (code == 0 and "TORCHTITAN_ARGS=(" in text) or (code == 2 and "no torchtitan equivalent" in said)


def test_solve_infeasible_exits_3_with_the_binding_constraint() -> None:
    code, stdout, stderr = invoke("solve", "--model", "2x70B", "--cluster", "a800-2x8", "--nodes", "1")
    assert code == 3 and stdout == ""
    assert "needs at least" in " ".join(stderr.replace("│", " ").split())


def test_solve_with_model_altering_options() -> None:
    args = ("solve", "--model", "tiny-moe", "--cluster", "a800-2x8", "--gbs", "32", "--condense", "0.3",
            "--topology-aware-routing")  # fmt: skip
    # Megatron-LM has neither: refused with the framework that runs them, not dropped.
    code, _, stderr = invoke(*args)
    assert code == 3 and "--framework moeplan" in " ".join(stderr.replace("│", " ").split())
    code, stdout, _ = invoke(*args, "--framework", "moeplan", "--json")
    plan = json.loads(stdout)
    plain = json.loads(invoke(*args[:7], "--framework", "moeplan", "--json")[1])
    # Offered, not stamped: carried only by a strictly faster plan, TA-MoE only where it changes the traffic.
    dispatcher = plan["parallel"]["dispatcher"]
    carried = dispatcher["condense_fraction"] or dispatcher["topology_aware_routing"]
    faster = plan["estimate"]["step_time_s"] < plain["estimate"]["step_time_s"]
    assert code == 0 and bool(carried) == faster
    assert not dispatcher["topology_aware_routing"] or dispatcher["kind"] in ("alltoall", "monta")
    code, stdout, _ = invoke(*args, "--framework", "moeplan")
    said = "the plan carries" if carried else "no plan with it is faster"
    assert code == 0 and f"Offered TA-MoE, condensation: {said}" in " ".join(stdout.split())
    assert invoke("solve", "--model", "tiny-moe", "--condense", "1.5")[0] == 2


def test_solve_json_is_the_only_thing_on_standard_output(tmp_path: Path) -> None:
    # In a real process (not CliRunner): a solver library writing to file descriptor 1 (highspy 1.16
    # prints a banner there) would break every consumer of --json.
    done = subprocess.run(
        [sys.executable, "-m", "planner", "solve", "--model", "tiny-moe", "--cluster", "v100-pcie", "--seq-len", "1024",
         "--gbs", "64", "--json"],
        cwd=tmp_path, env={**os.environ, "MOEPLAN_HOME": str(tmp_path)}, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["solver"]["optimal"]
