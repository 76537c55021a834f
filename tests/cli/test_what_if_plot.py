"""``moeplan solve --what-if`` and ``moeplan plot`` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.catalog import load_cluster
from planner.overrides import apply_what_if, parse_assignment
from tests.cli.invoke import invoke

MAIN_JOB = ["--model", "2x70B", "--cluster", "a800-2x8", "--nodes", "4", "--seq-len", "8192", "--gbs", "64"]


def test_inter_node_gbps_scales_every_fit_and_keeps_the_fraction_of_line_rate() -> None:
    profile = load_cluster("a800-2x8")
    changed = apply_what_if(profile, [parse_assignment("inter_node_gbps=100")])
    before, after = profile.links["inter_node"], changed.links["inter_node"]
    assert after.nominal_gbps == 100
    for kind, fit in before.collectives.items():
        assert after.collectives[kind].bandwidth_gbps == pytest.approx(
            fit.bandwidth_gbps * 100 / before.nominal_gbps
        )
        assert after.collectives[kind].latency_us == fit.latency_us
    assert changed.links["intra_node"] == profile.links["intra_node"]
    assert "what-if: inter_node_gbps=100" in changed.provenance.source


def test_a_dotted_path_changes_one_figure() -> None:
    profile = load_cluster("a800-2x8")
    changed = apply_what_if(
        profile, [parse_assignment("links.inter_node.collectives.all_to_all.bandwidth_gbps=50")]
    )
    assert changed.links["inter_node"].collectives["all_to_all"].bandwidth_gbps == 50
    assert (
        changed.links["inter_node"].collectives["all_reduce"]
        == profile.links["inter_node"].collectives["all_reduce"]
    )


def test_what_if_json_shows_the_plan_moving_with_the_network() -> None:
    # NVLink at a tenth of its rate: the time must grow; the base plan is unchanged by the option.
    code, stdout, _ = invoke("solve", *MAIN_JOB, "--what-if", "intra_node_gbps=20", "--json")
    assert code == 0
    report = json.loads(stdout)
    base, what_if = report["plan"], report["what_if"]
    assert what_if["assignments"] == {"intra_node_gbps": 20}
    assert what_if["relative_change"] > 0.05
    assert what_if["plan"]["estimate"]["step_time_s"] > base["estimate"]["step_time_s"]
    for change in what_if["changes"]:
        assert change["before"] != change["after"]
    _, plain, _ = invoke("solve", *MAIN_JOB, "--json")
    alone = json.loads(plain)
    assert (alone["parallel"], alone["estimate"]) == (base["parallel"], base["estimate"])


def test_what_if_text_names_the_change() -> None:
    code, stdout, _ = invoke("solve", *MAIN_JOB, "--what-if", "hbm_gib=40")
    assert code == 0 and "What if hbm_gib=40:" in stdout


@pytest.mark.parametrize(
    ("assignment", "phrase"),
    [
        ("inter_node_gbps", "must be FIELD=VALUE"),
        ("inter_node_gbps=-3", "positive number"),
        ("inter_node_gbs=100", "inter_node_gbps"),
        ("gpu.efficiency.gemm_fraction_bf16=1.5", "gemm_fraction_bf16"),
        ("gpu.nothing=1", "has no 'nothing'"),
    ],
)
def test_bad_what_if_is_one_paragraph_exit_2(assignment: str, phrase: str) -> None:
    code, stdout, stderr = invoke("solve", *MAIN_JOB, "--what-if", assignment)
    assert code == 2 and phrase in " ".join(stderr.replace("│", " ").split()), stderr


def test_plot_from_a_solve_and_from_a_plan(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    figure = tmp_path / "top.png"
    code, stdout, _ = invoke(
        "plot", "--model", "mixtral-8x7b", "--cluster", "dgx-h100", "--nodes", "2", "-o", str(figure)
    )
    assert code == 0 and "3 plan(s)" in stdout
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan = tmp_path / "plan.json"
    assert invoke("solve", *MAIN_JOB, "-o", str(plan))[0] == 0
    page = tmp_path / "plan.html"
    code, stdout, _ = invoke("plot", "--plan", str(plan), "-o", str(page))
    html = page.read_text(encoding="utf-8")
    assert code == 0 and "<svg" in html and "2x70B" in html and "1 plan(s)" in stdout


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["-o", "x.png"], "exactly one of --plan"),
        (["--model", "tiny-moe", "--cluster", "v100-pcie", "-o", "x.pdf"], ".png, .svg or .html"),
        (["--model", "tiny-moe", "--top", "0", "-o", "x.png"], "--top"),
    ],
)
def test_plot_bad_input(tmp_path: Path, args: list[str], phrase: str) -> None:
    pytest.importorskip("matplotlib")
    code, _, stderr = invoke("plot", *[str(tmp_path / a) if a.startswith("x.") else a for a in args])
    assert code == 2 and phrase in " ".join(stderr.replace("│", " ").split()), stderr
