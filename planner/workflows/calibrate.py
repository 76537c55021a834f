"""``moeplan calibrate`` as a workflow: fit a profile to run records, write it, and report each knob and
each run's error before and after, on the fit runs and on the held-out runs."""

from __future__ import annotations

import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from planner.accuracy.calibrate import RunRecord, calibrate, load_runs, mean_absolute_error, predict
from planner.catalog import load_cluster, profile_yaml
from planner.errors import SpecError
from planner.specfiles import atomic_write_text, check_writable

__all__ = ["calibrate_profile"]


def _errors(runs: Sequence[RunRecord], before: Sequence[float], after: Sequence[float]) -> dict[str, Any]:
    return {
        "runs": len(runs),
        "mape_before": mean_absolute_error(before, runs),
        "mape_after": mean_absolute_error(after, runs),
    }


def _records_folder(path: Path, option: str) -> None:
    """SpecError unless ``path`` is a folder (named by its option: ``--runs`` or ``--held-out``)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise SpecError(
            f"{option} '{path}' does not exist: give a folder of `moeplan run -o` records."
        ) from None
    except OSError as exc:
        raise SpecError(f"{option} '{path}' cannot be read: {exc.strerror or exc}.") from None
    if not stat.S_ISDIR(info.st_mode):
        raise SpecError(f"{option} '{path}' is not a folder of `moeplan run -o` records.")


def calibrate_profile(runs: Path, cluster: str, output: Path, held_out: Path | None) -> dict[str, Any]:
    """Fit ``cluster`` to the records in ``runs``, write the calibrated profile to ``output``, and report."""
    profile = load_cluster(cluster)
    _records_folder(runs, "--runs")
    fit_runs = load_runs(runs)
    if held_out is not None:
        _records_folder(held_out, "--held-out")
    other_runs = load_runs(held_out) if held_out is not None else []
    check_writable(output)  # before the fit, not after it
    result = calibrate(profile, fit_runs)
    other_before = [predict(profile, run) for run in other_runs]
    other_after = [predict(result.profile, run) for run in other_runs]
    atomic_write_text(
        output,
        profile_yaml(
            result.profile,
            f"Calibrated by `moeplan calibrate --runs {runs} --cluster {cluster}` from {len(fit_runs)} run(s);",
            "each changed figure's source says how calibration changed it.",
        ),
    )
    sets = (
        ("fit", fit_runs, result.fit_before, result.fit_after),
        ("held-out", other_runs, other_before, other_after),
    )
    rows = [
        {"run": str(run.path), "set": kind, "measured_s": run.measured_step_s, "predicted_before_s": before,
         "predicted_after_s": after, "error_before": before / run.measured_step_s - 1,
         "error_after": after / run.measured_step_s - 1}
        for kind, group, befores, afters in sets
        for run, before, after in zip(group, befores, afters, strict=True)
    ]  # fmt: skip
    return {
        "knobs": [{"name": n, "before": b, "after": a} for n, b, a in result.knobs],
        "runs": rows,
        "output": str(output),
        "fit": _errors(fit_runs, result.fit_before, result.fit_after),
        "held_out": _errors(other_runs, other_before, other_after) if other_runs else None,
    }
