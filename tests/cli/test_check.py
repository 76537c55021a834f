"""``moeplan check``: golden cases pass, a perturbed profile fails with a readable diff, exit codes, reports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
import yaml

from planner.accuracy.golden import find_cases, load_case
from planner.catalog.data import CLUSTERS_DIR
from tests.cli.invoke import invoke

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GOLDEN = EXAMPLES / "golden"


def write_case(folder: Path, name: str, **fields: object) -> Path:
    doc = {"format": "moeplan-check/1", "model": "2x70B", "cluster": "a800-2x8", "nodes": 4}
    doc |= {"training": {"seq_len": 8192, "global_batch": 64}, "expected": f"{name}.plan.json"}
    doc |= fields
    path = folder / f"{name}.check.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def test_golden_cases_cover_the_catalog_and_the_required_pairs() -> None:
    cases = [load_case(p) for p in find_cases([EXAMPLES])]
    assert len(cases) >= 12
    pairs = {(c.model.lower(), c.cluster) for c in cases}
    assert ("2x70b", "a800-2x8") in pairs and ("deepseek-v3", "h800-dsv3") in pairs
    for path in find_cases([EXAMPLES]):
        case = load_case(path)
        if case.expected is not None:
            assert (path.parent / case.expected).is_file(), f"{path}: expected plan missing"


@pytest.mark.parametrize(
    "name",
    [
        "2x70b-a800-4x8",
        "2x70b-a800-8x8-monta",
        "2x70b-a800-2x8",
        "2x70b-a800-1x8-infeasible",
        "tiny-moe-v100-pcie",
    ],
)
def test_fast_golden_cases_pass(name: str) -> None:
    code, stdout, _ = invoke("check", str(GOLDEN / f"{name}.check.yaml"))
    assert code == 0, stdout
    assert "PASS" in stdout and "1 cases: 1 pass, 0 regressed" in stdout


def test_update_writes_then_passes_without_rewriting(tmp_path: Path) -> None:
    case = write_case(tmp_path, "mine")
    assert invoke("check", str(case))[0] == 2  # no expected plan yet: bad input, not a pass
    code, stdout, _ = invoke("check", str(tmp_path), "--update")
    assert code == 0 and "UPDATED" in stdout
    plan = tmp_path / "mine.plan.json"
    first = plan.read_bytes()
    assert first == (GOLDEN / "2x70b-a800-4x8.plan.json").read_bytes()  # same inputs, same bytes
    code, stdout, _ = invoke("check", str(tmp_path), "--update")
    assert code == 0 and "UPDATED" not in stdout and plan.read_bytes() == first


def test_a_perturbed_profile_fails_with_a_readable_diff(tmp_path: Path) -> None:
    profile = tmp_path / "cluster.yaml"
    shutil.copy(CLUSTERS_DIR / "a800-2x8.yaml", profile)
    case = write_case(tmp_path, "perturbed", cluster="cluster.yaml")
    assert invoke("check", str(case), "--update")[0] == 0
    # NVLink at a quarter of its measured rate (as if the node were a PCIe box): the plan must move.
    text = profile.read_text(encoding="utf-8")
    assert "bandwidth_gbps: 160" in text
    profile.write_text(text.replace("bandwidth_gbps: 160", "bandwidth_gbps: 40"), encoding="utf-8")
    junit = tmp_path / "report.xml"
    code, stdout, _ = invoke("check", str(case), "--junit-xml", str(junit))
    assert code == 1, stdout
    golden = json.loads((GOLDEN / "2x70b-a800-4x8.plan.json").read_text(encoding="utf-8"))
    assert "FAIL" in stdout and f"predicted step time: {golden['estimate']['step_time_s']:.6g} s ->" in stdout
    assert "beyond the tolerance of 0.50%" in stdout
    code, out_json, _ = invoke("check", str(case), "--json")
    report = json.loads(out_json)
    [outcome] = report["cases"]
    assert code == 1 and not report["ok"] and outcome["status"] == "regression"
    assert outcome["relative_change"] > 0.005
    for change in outcome["changes"]:  # every changed field is named in the text diff too
        assert f"{change['field']}: " in stdout
    suite = ElementTree.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "1" and suite.get("failures") == "1"
    failure = suite.find("testcase/failure")
    assert failure is not None and "predicted step time" in (failure.text or "")


def test_a_plan_that_became_feasible_is_a_regression(tmp_path: Path) -> None:
    case = write_case(tmp_path, "inf", model="tiny-moe", cluster="v100-pcie", nodes=1, expected=None)
    doc = yaml.safe_load(case.read_text())
    doc.pop("expected")
    doc["expect_infeasible"] = True
    case.write_text(yaml.safe_dump(doc))
    code, stdout, _ = invoke("check", str(case), "--update")
    assert code == 1 and "expected no layout to fit" in stdout


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"format": "moeplan-check/0"}, "format: moeplan-check/1"),
        ({"tolerence": 0.1}, "tolerence"),
        ({"expect_infeasible": True}, "exactly one of expected"),
        ({"tolerance": 2}, "tolerance"),
        ({"model": "no-such-model"}, "no-such-model"),
    ],
)
def test_bad_cases_exit_2_with_one_paragraph(tmp_path: Path, fields: dict[str, object], words: str) -> None:
    case = write_case(tmp_path, "bad", **fields)
    (tmp_path / "bad.plan.json").write_bytes((GOLDEN / "2x70b-a800-4x8.plan.json").read_bytes())
    code, stdout, stderr = invoke("check", str(case))
    assert (
        code == 2
        and words in " ".join(stderr.replace("│", " ").split())
        and "Traceback" not in stderr + stdout
    )


def test_no_cases_and_missing_paths_are_bad_input(tmp_path: Path) -> None:
    assert invoke("check", str(tmp_path))[0] == 2
    assert invoke("check", str(tmp_path / "nowhere"))[0] == 2


def test_check_is_deterministic_across_hash_seeds() -> None:
    cases = [str(GOLDEN / f"{n}.check.yaml") for n in ("2x70b-a800-4x8", "deepseek-v2-lite-a800-2x8")]
    outputs = set()
    for seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-m", "planner", "check", *cases, "--json"],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        outputs.add(done.stdout)
    assert len(outputs) == 1


def test_the_github_actions_example_runs_check_with_a_junit_report() -> None:
    workflow = yaml.safe_load((EXAMPLES / "ci" / "moeplan-check.yml").read_text(encoding="utf-8"))
    steps = workflow["jobs"]["check"]["steps"]
    commands = [step.get("run", "") for step in steps]
    assert any(c.startswith("moeplan check ") and "--junit-xml moeplan-check.xml" in c for c in commands)
    assert any(step.get("with", {}).get("report_paths") == "moeplan-check.xml" for step in steps)


@pytest.mark.parametrize("expected", ["../outside.plan.json", "/tmp/anywhere.plan.json", "."])
def test_update_writes_only_inside_the_case_folder(tmp_path: Path, expected: str) -> None:
    folder = tmp_path / "cases"
    folder.mkdir()
    case = write_case(folder, "escape", model="tiny-moe", cluster="dgx-h100", nodes=1, expected=expected)
    code, _, stderr = invoke("check", str(case), "--update")
    assert code == 2 and "must name a plan file in the case's folder" in " ".join(
        w for w in stderr.split() if w != "│"
    )
    assert not (tmp_path / "outside.plan.json").exists() and not Path("/tmp/anywhere.plan.json").exists()
