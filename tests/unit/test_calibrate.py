"""Calibration: records in, knobs fitted, error down on runs the fit did not see."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from planner.accuracy.calibrate import (
    calibrate,
    knobs_for,
    load_runs,
    mean_absolute_error,
    predict,
    with_knobs,
)
from planner.catalog import load_cluster
from planner.errors import SpecError

DATA = Path(__file__).resolve().parents[1] / "data" / "calibration"
PROFILE = DATA / "testbed.yaml"


def test_recorded_runs_load_with_their_median_step_time() -> None:
    runs = load_runs(DATA / "fit")
    assert len(runs) >= 6
    for run in runs:
        steps = sorted(s["time_s"] for s in json.loads(run.path.read_text())["steps"][1:])
        assert min(steps) <= run.measured_step_s <= max(steps)
        assert run.world_size == 4 and run.ranks_per_node == 2


def test_each_knob_moves_the_prediction_the_way_its_name_says() -> None:
    profile = load_cluster(str(PROFILE))
    runs = load_runs(DATA / "fit")
    knobs = knobs_for(profile, runs)
    names = [k.name for k in knobs]
    assert names[:3] == ["gemm_efficiency", "memory_efficiency", "step_overhead_s"]
    assert "inter_node_all_to_all_speed" in names and "intra_node_all_to_all_speed" in names
    # The runs' gradient all-reduces span both nodes and there is no TP: nothing else crosses NVLink's
    # stand-in, so its other collectives cannot be fitted and are left as probed.
    assert "intra_node_collective_speed" not in names
    base = [predict(profile, run) for run in runs]
    for index, knob in enumerate(knobs):
        values = [k.initial for k in knobs]
        values[index] = knob.initial * 0.5 if knob.name != "step_overhead_s" else knob.initial + 0.1
        slower = [predict(with_knobs(profile, knobs, values), run) for run in runs]
        # Half the efficiency or bandwidth, or more host time, never speeds a step up, and slows some.
        assert all(s >= b * (1 - 1e-12) for s, b in zip(slower, base, strict=True)), knob.name
        assert any(s > b * 1.001 for s, b in zip(slower, base, strict=True)), knob.name


def test_calibration_lowers_the_error_on_held_out_runs() -> None:
    profile = load_cluster(str(PROFILE))
    fit, held_out = load_runs(DATA / "fit"), load_runs(DATA / "held-out")
    result = calibrate(profile, fit)
    assert mean_absolute_error(result.fit_after, fit) < mean_absolute_error(result.fit_before, fit)
    before = mean_absolute_error([predict(profile, r) for r in held_out], held_out)
    after = mean_absolute_error([predict(result.profile, r) for r in held_out], held_out)
    assert after < before
    assert "calibrated by moeplan calibrate" in result.profile.provenance.source
    # Deterministic: the same runs give the same profile.
    assert calibrate(profile, fit).profile == result.profile


def test_a_record_of_another_format_or_cluster_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "runs"
    folder.mkdir()
    source = sorted((DATA / "fit").glob("*.json"))[0]
    record = json.loads(source.read_text())
    (folder / "a.json").write_text(json.dumps({**record, "format": "something-else"}))
    with pytest.raises(SpecError, match="moeplan-run/1"):
        load_runs(folder)
    (folder / "a.json").write_text(json.dumps({**record, "ranks_per_node": 4}))
    with pytest.raises(SpecError, match="ranks_per_node"):
        calibrate(load_cluster(str(PROFILE)), load_runs(folder))
    shutil.rmtree(folder)
    with pytest.raises(SpecError, match="not a folder"):
        load_runs(folder)


def _broken_record(tmp_path: Path, change: dict[str, object]) -> Path:
    folder = tmp_path / "runs"
    folder.mkdir(exist_ok=True)
    record = json.loads(sorted((DATA / "fit").glob("*.json"))[0].read_text())
    (folder / "a.json").write_text(json.dumps({**record, **change}))
    return folder


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        ({"steps": [{"step": 0, "time_s": 1.0}, {"step": 1, "time_s": 0.0}]}, "step time 0.0 is not a measured time"),
        ({"steps": [{"step": 0, "time_s": 1.0}, {"step": 1, "time_s": -2.0}]}, "step time -2.0"),
        ({"collectives": {"all_to_all": -1.0}}, "negative or not finite"),
        ({"collectives": ["all_to_all"]}, "must map collective kinds to seconds"),
        ({"world_size": 3}, "is not whole nodes of ranks_per_node"),
    ],
)  # fmt: skip
def test_records_that_cannot_be_measurements_are_refused(
    tmp_path: Path, change: dict[str, object], rule: str
) -> None:
    with pytest.raises(SpecError, match=rule):
        load_runs(_broken_record(tmp_path, change))


def test_a_record_whose_layout_cannot_have_run_is_not_fitted(tmp_path: Path) -> None:
    record = json.loads(sorted((DATA / "fit").glob("*.json"))[0].read_text())
    parallel = {**record["parallel"], "tp": 3}
    with pytest.raises(SpecError, match="its layout cannot have run on 4 ranks"):
        load_runs(_broken_record(tmp_path, {"parallel": parallel}))
