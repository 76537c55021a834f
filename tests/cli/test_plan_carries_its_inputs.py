"""A plan carries what launching and pricing it need: its node shape and where its inputs came from.

The cases of the structure issue: a plan solved on a hand-written profile (4 nodes x 8) and one solved
on a probed profile (the README's default flow) both emit torchrun and Slurm scripts for their nodes,
re-price, and plot from the plan alone; a changed profile file is refused, not silently used; a plan of
schema version 1 is migrated.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from planner.catalog import LAST_PROBE_NAME
from planner.emit import load_plan
from planner.schema import OptimizerConfig
from tests.cli.invoke import invoke
from tests.conftest import REPO

MY_CLUSTER = REPO / "examples" / "my-cluster.yaml"
PROBED = REPO / "tests" / "data" / "calibration" / "testbed.yaml"  # a probe's profile: 2 nodes x 2 ranks


def _launch_shape(plan: Path) -> tuple[list[str], list[str]]:
    code, torchrun, _ = invoke("emit", "--plan", str(plan), "--format", "torchrun")
    assert code == 0
    code, slurm, _ = invoke("emit", "--plan", str(plan), "--format", "slurm")
    assert code == 0
    flags = torchrun.split()
    directives = [line.removeprefix("#SBATCH ") for line in slurm.splitlines() if line.startswith("#SBATCH")]
    return flags[flags.index("--nnodes") : flags.index("--nproc-per-node") + 2], directives


def test_a_plan_on_a_profile_file_emits_its_four_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copy(MY_CLUSTER, "my-cluster.yaml")
    code, _, stderr = invoke("solve", "--model", "mixtral-8x7b", "--cluster", "my-cluster.yaml", "--gbs", "256",
                             "-o", "plan.json")  # fmt: skip
    assert code == 0, stderr
    plan = load_plan("plan.json")
    assert (plan.num_nodes, plan.num_gpus_per_node, plan.num_gpus) == (4, 8, 32)
    assert (plan.cluster.source, plan.cluster.path) == ("file", "my-cluster.yaml")
    torchrun, directives = _launch_shape(Path("plan.json"))
    assert torchrun == ["--nnodes", "4", "\\", "--nproc-per-node", "8"]
    assert "--nodes=4" in directives and "--gpus-per-node=8" in directives
    # Re-priced from the plan alone, it gives the plan's own estimate.
    code, stdout, _ = invoke("estimate", "--plan", "plan.json", "--json")
    assert code == 0 and plan.estimate is not None
    assert json.loads(stdout)["estimate"]["step_time_s"] == pytest.approx(plan.estimate.step_time_s, rel=1e-9)
    code, stdout, _ = invoke("plot", "--plan", "plan.json", "-o", "plan.svg")
    assert code == 0 and Path("plan.svg").stat().st_size > 0
    # From another directory the file is found beside the plan.
    os.mkdir("elsewhere")
    monkeypatch.chdir("elsewhere")
    assert invoke("estimate", "--plan", "../plan.json", "--json")[0] == 0
    # A profile changed since the plan was made is refused, with what to do.
    monkeypatch.chdir(tmp_path)
    Path("my-cluster.yaml").write_text(MY_CLUSTER.read_text().replace("nominal_gbps: 25", "nominal_gbps: 50"))
    code, _, stderr = invoke("estimate", "--plan", "plan.json")
    said = " ".join(stderr.replace("│", " ").split())
    assert code == 2 and "changed since the plan was made" in said and "Traceback" not in said
    # ... while the launch scripts need no profile at all.
    assert _launch_shape(Path("plan.json"))[0] == ["--nnodes", "4", "\\", "--nproc-per-node", "8"]


def test_a_plan_on_the_last_probe_survives_the_next_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    home = Path(os.environ["MOEPLAN_HOME"])
    home.mkdir(parents=True)
    shutil.copy(PROBED, home / LAST_PROBE_NAME)
    code, _, stderr = invoke(
        "solve", "--model", "tiny-moe", "--gbs", "16", "--seq-len", "256", "-o", "plan.json"
    )
    assert code == 0 and "last probed profile" in stderr
    plan = load_plan("plan.json")
    assert (plan.cluster.name, plan.cluster.source) == ("probe-vm-2x2", "probe")
    assert plan.cluster.path is not None and Path(plan.cluster.path).parent == home / "profiles"
    (home / LAST_PROBE_NAME).write_text("name: the next probe\n")  # a later probe replaces it
    torchrun, directives = _launch_shape(Path("plan.json"))
    assert torchrun == ["--nnodes", "2", "\\", "--nproc-per-node", "2"]
    assert "--nodes=2" in directives and "--gpus-per-node=2" in directives
    code, stdout, _ = invoke("estimate", "--plan", "plan.json", "--json")
    assert code == 0 and json.loads(stdout)["cluster"] == "probe-vm-2x2"
    assert invoke("plot", "--plan", "plan.json", "-o", "plan.png")[0] == 0


def test_estimate_plan_takes_changes_by_dotted_path(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    assert (
        invoke("solve", "--model", "mixtral-8x7b", "--cluster", "dgx-h100", "--gbs", "256", "-o", str(out))[0]
        == 0
    )
    code, stdout, stderr = invoke("estimate", "--plan", str(out), "--set", "parallel.pp=1", "--set", "parallel.vpp=1",
                                  "--tp", "8", "--json")  # fmt: skip
    parallel = json.loads(stdout)["parallel"]
    assert code == 0 and (parallel["tp"], parallel["pp"], parallel["vpp"], parallel["dp"]) == (8, 1, 1, 4)
    code, _, stderr = invoke("estimate", "--plan", str(out), "--set", "parallel.tq=2")
    said = " ".join(stderr.replace("│", " ").split())
    assert code == 2 and "parallel has no 'tq'" in said and " tp," in said
    code, _, stderr = invoke("estimate", "--plan", str(out), "--set", "cluster.name=x")
    assert code == 2 and "only the plan's parallel.* and training.*" in " ".join(
        stderr.replace("│", " ").split()
    )


def test_a_version_2_plan_reads_with_megatron_lm_optimizer_defaults(tmp_path: Path) -> None:
    v3 = json.loads((REPO / "examples" / "golden" / "mixtral-8x7b-dgx-h100.plan.json").read_text())
    v2 = v3 | {"schema_version": 2, "parallel": {k: v for k, v in v3["parallel"].items() if k != "optimizer"}}
    old = tmp_path / "old.plan.json"
    old.write_text(json.dumps(v2))
    plan = load_plan(old)
    assert plan.schema_version == 3 and plan.parallel.optimizer == OptimizerConfig()
    assert plan.parallel.optimizer.main_grads_dtype == "fp32" and not plan.parallel.optimizer.offloads


def test_a_version_1_plan_is_migrated_or_refused_with_the_reason(tmp_path: Path) -> None:
    v3 = json.loads((REPO / "examples" / "golden" / "mixtral-8x7b-dgx-h100.plan.json").read_text())
    v1 = {k: v for k, v in v3.items() if k not in ("num_nodes", "num_gpus_per_node")}
    v1 |= {"schema_version": 1, "model": "mixtral-8x7b", "cluster": "dgx-h100"}
    v1["parallel"] = {k: v for k, v in v3["parallel"].items() if k != "optimizer"}
    old = tmp_path / "old.plan.json"
    old.write_text(json.dumps(v1))
    migrated = load_plan(old)
    assert (migrated.num_nodes, migrated.num_gpus_per_node, migrated.cluster.source) == (4, 8, "bundled")
    assert migrated.schema_version == 3 and migrated.parallel.model_dump(mode="json") == v3["parallel"]
    old.write_text(json.dumps(v1 | {"cluster": "probe-host-2x8"}))
    code, _, stderr = invoke("emit", "--plan", str(old), "--format", "torchrun")
    said = " ".join(stderr.replace("│", " ").split())
    assert code == 2 and "schema_version 1" in said and "probe-host-2x8" in said and "Solve it again" in said
