"""Whatever its budget, a probe writes a profile with every fit it could make (and says what it skipped
or fitted poorly), or exits 5 with a one-paragraph message and nothing written; never a traceback.

The fast tests feed the CLI synthetic records (``launch`` replaced) whose timings give no fit where
chosen; the slow one runs the real probe on 4 gloo ranks at short budgets, ``MOEPLAN_PROBE_REPEATS``
times each (default 2: one run takes 20-40 s on 2 cores, and the 10 runs per budget that issue 19
asks for took 16 minutes there, too long for CI).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from planner.catalog import load_cluster
from planner.cli import app
from planner.probe.bandwidth import BENCH_KINDS, algbw_gbps, bus_factor, busbw_gbps
from planner.probe.fit import POOR_FIT_RMS
from planner.probe.probe_options import ProbeOptions
from planner.probe.results import DeviceMeasurements, GemmPoint, Measurement, ProbeResults, RankIdentity
from planner.schema import COLLECTIVE_KINDS

runner = CliRunner()

LATENCY_S, BUSBW_GBPS = 40e-6, 0.8
SIZES = [2**k for k in range(10, 24, 2)]


def _series(scope: str, kind: str, n: int, groups: int, wobble: float = 0.0) -> list[Measurement]:
    """One collective's timings on an alpha-beta link; ``wobble`` alternately slows and speeds sizes by
    that fraction (a busy host), which leaves the fit's slope positive and its rms error about ``wobble``."""
    points = []
    for i, size in enumerate(SIZES):
        seconds = (LATENCY_S + size * bus_factor(kind, n) / (BUSBW_GBPS * 1e9)) * (1 + wobble * (-1) ** i)  # type: ignore[arg-type]
        points.append(
            Measurement(
                scope=scope,  # type: ignore[arg-type]
                kind=kind,  # type: ignore[arg-type]
                group_size=n,
                groups=groups,
                size_bytes=size,
                seconds=seconds,
                iterations=5,
                algbw_gbps=algbw_gbps(size, seconds),
                busbw_gbps=busbw_gbps(kind, n, size, seconds),  # type: ignore[arg-type]
            )
        )
    return points


def _falling(points: list[Measurement]) -> list[Measurement]:
    """The series with its largest size as fast as its smallest: time falls over the largest sizes."""
    last = points[-1].model_copy(update={"seconds": points[0].seconds})
    return [*points[:-1], last]


def _record(
    unfittable: tuple[str, ...] = (), wobbly: tuple[str, ...] = (), gemm_falls: bool = False
) -> ProbeResults:
    """A 1-node, 4-rank gloo record; the collectives named in ``unfittable`` give no fit, those in
    ``wobbly`` a poor one (50% wobble), and the GEMMs none when ``gemm_falls``."""
    measurements = []
    for kind in BENCH_KINDS:
        points = _series("intra_node", kind, 4, 1, wobble=0.5 if kind in wobbly else 0.0)
        measurements += _falling(points) if kind in unfittable else points
    shapes = [(128, 128, 128), (256, 256, 256), (512, 512, 512), (1024, 1024, 1024)]
    gemm = [GemmPoint(m=m, n=n, k=k, seconds=3e-6 + 2 * m * n * k / 5e10) for m, n, k in shapes]
    if gemm_falls:
        gemm[-1] = gemm[-1].model_copy(update={"seconds": gemm[0].seconds})
    device = DeviceMeasurements(
        kind="cpu",
        name="Test CPU",
        dtype="float32",
        threads=1,
        gemm=tuple(gemm),
        attention_fwd_tflops=0.02,
        attention_bwd_tflops=0.015,
        memory_copy_gbps=7.0,
        memory_gib=5.5,
        host_overhead_us=1.5,
        attention_shape="1x8x512x64",
    )
    return ProbeResults(
        command="moeplan probe --nproc 4",
        date="2026-12-05",
        backend="gloo",
        world_size=4,
        budget_s=20,
        elapsed_s=18.0,
        identities=tuple(
            RankIdentity(rank=r, hostname="box", address="127.0.0.1", device="cpu", device_name="Test CPU")
            for r in range(4)
        ),
        nodes=((0, 1, 2, 3),),
        measurements=tuple(measurements),
        device=device,
    )


def _probe_on(
    record: ProbeResults, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str
) -> tuple[int, str, str]:
    """``moeplan probe --nproc 4 -o p.yaml`` with the ranks replaced by ``record``: exit code, stdout and
    stdout with stderr."""

    def launch(options: ProbeOptions, placement: object, progress: object = None) -> ProbeResults:
        return record

    monkeypatch.setattr("planner.workflows.probe.launch", launch)
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    result = runner.invoke(
        app, ["probe", "--nproc", "4", "--backend", "gloo", "-o", str(tmp_path / "p.yaml"), *args]
    )
    return result.exit_code, result.stdout, result.output


def _one_line(text: str) -> str:
    """Rich's wrapped output joined back into one line (panel borders and line breaks dropped)."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_a_series_the_profile_does_not_use_is_skipped_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "all_to_all_v" not in COLLECTIVE_KINDS
    code, stdout, output = _probe_on(_record(unfittable=("all_to_all_v",)), tmp_path, monkeypatch, "--json")
    assert code == 0, output
    said = _one_line(output)
    assert (
        "warning: skipped all_to_all_v on the intra_node link: its timings give no fit (time does not grow"
        in said
    )
    profile = load_cluster(str(tmp_path / "p.yaml"))
    (warning,) = profile.provenance.warnings or ()
    assert warning.startswith("skipped all_to_all_v on the intra_node link")
    summary = json.loads(stdout)
    assert summary["warnings"] == [warning]
    (link,) = summary["links"]
    assert set(link["collectives"]) == set(BENCH_KINDS) - {"all_to_all_v"}


def test_a_series_the_profile_needs_without_a_fit_is_exit_5_naming_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = _record(unfittable=("all_gather", "send_recv", "all_to_all_v"), gemm_falls=True)
    code, _, output = _probe_on(record, tmp_path, monkeypatch)
    assert code == 5, output
    said = _one_line(output)
    assert "Traceback" not in output and not (tmp_path / "p.yaml").exists()
    sizes = "7 sizes 1 KiB-4 MiB"  # each needed series, with the sizes it reached
    assert (
        f"all_gather ({sizes}), send_recv ({sizes}) on the intra_node link timings give no fit (time" in said
    )
    assert "float32 GEMM timings give no fit (time does not grow" in said
    assert "all_to_all_v" not in said  # not needed, so not a reason to refuse
    assert "none was written" in said and "larger --budget" in said


def test_a_poor_fit_is_kept_and_flagged_in_the_profile_and_on_screen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, output = _probe_on(_record(wobbly=("reduce_scatter",)), tmp_path, monkeypatch)
    assert code == 0, output
    profile = load_cluster(str(tmp_path / "p.yaml"))
    fits = profile.links["intra_node"].collectives
    rms = fits["reduce_scatter"].rms_relative_error
    assert rms is not None and rms > POOR_FIT_RMS
    assert "poor" in fits["reduce_scatter"].source
    others = [fit for kind, fit in fits.items() if kind != "reduce_scatter"]
    assert all(fit.rms_relative_error is not None and fit.rms_relative_error < 1e-6 for fit in others)
    assert not any("poor" in fit.source for fit in others)
    (warning,) = profile.provenance.warnings or ()
    assert warning.startswith(
        f"poor fit of reduce_scatter on the intra_node link: rms error {rms:.1%}, above {POOR_FIT_RMS:.0%}"
    )
    assert f"warning: {warning}" in _one_line(output)


def test_a_clean_probe_says_nothing_and_its_profile_has_no_warnings_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, output = _probe_on(_record(), tmp_path, monkeypatch)
    assert code == 0, output
    assert "warning" not in output
    document = yaml.safe_load((tmp_path / "p.yaml").read_text())
    assert "warnings" not in document["provenance"]


def test_a_profile_written_before_the_fit_quality_fields_still_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, output = _probe_on(_record(wobbly=("all_to_all",)), tmp_path, monkeypatch)
    assert code == 0, output
    document = yaml.safe_load((tmp_path / "p.yaml").read_text())
    del document["provenance"]["warnings"]
    for fit in document["links"]["intra_node"]["collectives"].values():
        del fit["rms_relative_error"]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(document))
    old = load_cluster(str(tmp_path / "old.yaml"))
    assert old.provenance.warnings is None
    assert all(fit.rms_relative_error is None for fit in old.links["intra_node"].collectives.values())


REPEATS = int(os.environ.get("MOEPLAN_PROBE_REPEATS", "2"))
"""Real probes per budget in the slow test; issue 19 asks for 10 (``MOEPLAN_PROBE_REPEATS=10``)."""


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(300 + 120 * REPEATS)
@pytest.mark.parametrize("budget", [20, 30, 40])
def test_a_short_budget_writes_a_profile_or_exits_5_never_a_traceback(budget: int, tmp_path: Path) -> None:
    outcomes, seconds = [], []
    for run in range(REPEATS):
        folder = tmp_path / f"run{run}"
        folder.mkdir()
        start = time.monotonic()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "planner",
                "probe",
                "--nproc",
                "4",
                "--backend",
                "gloo",
                "-o",
                "p.yaml",
                "--budget",
                str(budget),
                "--json",
            ],  # fmt: skip
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=budget + 180,
            env={**os.environ, "COLUMNS": "200"},
            check=False,
        )
        seconds.append(time.monotonic() - start)
        said = _one_line(done.stderr)
        assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
        assert done.returncode in (0, 5), done.stderr[-3000:]
        outcomes.append(done.returncode)
        if done.returncode == 5:
            assert "moeplan: error" in done.stderr and not (folder / "p.yaml").exists()
            continue
        summary = json.loads(done.stdout)
        profile = load_cluster(str(folder / "p.yaml"))
        assert summary["warnings"] == list(profile.provenance.warnings or ())
        (link,) = summary["links"]
        for kind in set(BENCH_KINDS) - set(link["collectives"]):  # each skipped series is named, with why
            assert f"warning: skipped {kind} on the intra_node link: its timings give no fit (" in said
        for kind, fit in link["collectives"].items():  # each poor fit too
            assert fit["poor_fit"] == (fit["rms_relative_error"] > POOR_FIT_RMS)
            if fit["poor_fit"]:
                assert f"warning: poor fit of {kind} on the intra_node link: rms error" in said
    print(
        f"budget {budget}: {outcomes.count(0)} profile(s), {outcomes.count(5)} exit 5 of {REPEATS} runs, "
        f"{min(seconds):.0f}-{max(seconds):.0f} s a run"
    )
