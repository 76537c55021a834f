"""``moeplan calibrate``: fit a cluster profile's efficiencies to measured ``moeplan run`` records.

The probe measures each piece alone (a GEMM, one collective on an idle link); a training step runs
them together, through a framework, on a shared host. Calibration closes that gap with a few
explainable knobs, fitted to the step times that ``moeplan run -o`` recorded on the same cluster:

- ``gemm_efficiency``: one factor on the GPU's achieved fractions of its tensor-core peak
  (``gemm_fraction_bf16``, ``gemm_fraction_fp8``, ``attention_fwd_fraction``,
  ``attention_bwd_fraction``), and ``memory_efficiency`` on its achieved memory bandwidth
  (``hbm_fraction``: element-wise kernels and the optimizer step), each at most what keeps every
  fraction <= 1;
- ``step_overhead_s``: host time per step outside every priced kernel and collective (the profile
  field of that name, 0 until calibrated): the part of a step no layout change removes;
- ``<link>_all_to_all_speed`` and ``<link>_collective_speed``: how many times as fast as probed the
  all-to-all, and every other collective, run on a link class (bandwidth x factor, latency / factor),
  for each class the runs send bytes over. The all-to-all has its own because a training step's
  dispatch (many small uneven exchanges per layer, the token counts first) runs unlike the probe's
  single large even exchange, while the gradient all-reduces resemble the probe's.

Fit: least squares (scipy's dogbox method, within the bounds above) on log ratios of
predicted to measured time: each run's step time, and each communication component the runtime timed
on its own (``COMPONENTS``: the expert dispatch's collectives against the ``ep_dispatch_combine``
term, the gradient all-reduces against ``dp_grad_reduce`` + ``dp_param_all_gather``), which pins
the link knobs to the collectives they price and leaves compute and host time to the rest; plus a weak prior that pulls each knob towards the probe's
own value (weight ``PRIOR_WEIGHT`` per knob, in log units), so that a knob the runs cannot see stays
where the measurement put it instead of drifting. The measured step time of a run is the median of
its steps after the first (which includes warm-up).

The calibrated profile keeps every figure's source and appends how calibration changed it. Runs left
out of the fit (``--held-out``) are priced with the profile before and after, which is the honest
measure of whether the calibration generalizes.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.catalog import load_model
from planner.costmodel import estimate
from planner.costmodel.runs import run_profile
from planner.errors import SpecError
from planner.feasibility import check_plan
from planner.schema import ClusterProfile, ModelSpec, ParallelConfig, TrainingSpec
from planner.specfiles import read_tagged_mapping, validate_spec

__all__ = [
    "PRIOR_WEIGHT",
    "RUN_RECORD_FORMAT",
    "Calibration",
    "Knob",
    "RunRecord",
    "calibrate",
    "knobs_for",
    "load_runs",
    "predict",
]

RUN_RECORD_FORMAT = "moeplan-run/1"
"""The ``format`` of a ``moeplan run -o`` record."""
PRIOR_WEIGHT = 0.1
"""Residual weight of each knob's log-distance from the probe's value (a run's residual weighs 1)."""
GEMM_FIELDS = ("gemm_fraction_bf16", "gemm_fraction_fp8", "attention_fwd_fraction", "attention_bwd_fraction")
"""The achieved fractions of the tensor-core peak that ``gemm_efficiency`` scales."""
MEMORY_FIELDS = ("hbm_fraction",)
"""The achieved fraction of memory bandwidth that ``memory_efficiency`` scales (element-wise kernels,
the optimizer step)."""


@dataclass(frozen=True, slots=True)
class RunRecord:
    """What calibration needs of one ``moeplan run`` record."""

    path: Path
    model: ModelSpec
    training: TrainingSpec
    parallel: ParallelConfig
    world_size: int
    ranks_per_node: int
    measured_step_s: float
    measured_collectives: dict[str, float]
    """Seconds per step in each collective kind the runtime timed (slowest rank)."""


def _count(data: dict[str, Any], field: str, path: Path) -> int:
    """``data[field]`` as a whole number (a float that is one, as JSON may write it, included)."""
    value = data[field]
    try:
        whole = int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: inf
        whole = None
    if whole is None or isinstance(value, bool) or whole != value:
        raise SpecError(f"run record '{path}': field {field} ({str(value)[:40]}) is not a whole number")
    return whole


def _record(path: Path) -> RunRecord:
    data = read_tagged_mapping(path, "run record (moeplan run -o)", RUN_RECORD_FORMAT)
    for field in ("steps", "model", "world_size", "ranks_per_node", "training", "parallel"):
        if field not in data:
            raise SpecError(f"run record '{path}': field {field} is missing")
    try:
        steps = [float(step["time_s"]) for step in data["steps"]]
    except (KeyError, TypeError, ValueError):
        raise SpecError(
            f"run record '{path}': field steps must be a list of steps, each with time_s"
        ) from None
    world, per_node = _count(data, "world_size", path), _count(data, "ranks_per_node", path)
    model, training_data, parallel_data = data["model"], data["training"], data["parallel"]
    if len(steps) < 2:
        raise SpecError(f"run record '{path}': steps has {len(steps)} step(s); calibration needs at least 2")
    bad = [t for t in steps if not (math.isfinite(t) and t > 0)]
    if bad:
        raise SpecError(f"run record '{path}': step time {bad[0]} is not a measured time (finite, above 0)")
    try:
        collectives = {str(k): float(v) for k, v in (data.get("collectives") or {}).items()}
    except (AttributeError, TypeError, ValueError):
        raise SpecError(
            f"run record '{path}': field collectives must map collective kinds to seconds"
        ) from None
    if any(not (math.isfinite(v) and v >= 0) for v in collectives.values()):
        raise SpecError(f"run record '{path}': field collectives holds a time that is negative or not finite")
    if world < 1 or per_node < 1 or world % per_node:
        raise SpecError(
            f"run record '{path}': world_size {world} is not whole nodes of ranks_per_node {per_node}"
        )
    record = RunRecord(
        path=path,
        model=load_model(model),
        training=validate_spec(TrainingSpec, training_data, f"run record '{path}', field training"),
        parallel=validate_spec(ParallelConfig, parallel_data, f"run record '{path}', field parallel"),
        world_size=world,
        ranks_per_node=per_node,
        measured_step_s=statistics.median(steps[1:]),
        measured_collectives=collectives,
    )
    broken = check_plan(record.model, record.training, record.parallel, world)
    rules = [str(v) for v in broken if not v.megatron_only and v.field not in ("pp*vpp", "layers_per_stage")]
    if rules:  # a record of a layout that cannot have run is not fitted
        raise SpecError(
            f"run record '{path}': its layout cannot have run on {world} ranks: {'; '.join(rules)}"
        )
    return record


def load_runs(folder: Path) -> list[RunRecord]:
    """Every ``*.json`` run record in ``folder`` (sorted by name)."""
    if not folder.is_dir():
        raise SpecError(f"--runs '{folder}' is not a folder of `moeplan run -o` records")
    runs = [_record(path) for path in sorted(folder.glob("*.json"))]
    if not runs:
        raise SpecError(f"--runs '{folder}' holds no run records (*.json written by `moeplan run -o`)")
    return runs


def profile_for(profile: ClusterProfile, run: RunRecord) -> ClusterProfile:
    """The profile that prices the run (``costmodel.runs.run_profile``: the rule ``moeplan run`` uses too)."""
    try:
        return run_profile(profile, run.world_size, run.ranks_per_node)
    except SpecError as exc:
        raise SpecError(
            f"run record '{run.path}': {exc}; calibrate with the profile of the cluster the runs ran on"
        ) from None


def predict(profile: ClusterProfile, run: RunRecord) -> float:
    """The cost model's step time for the run's layout on ``profile``."""
    return estimate(run.model, run.training, run.parallel, profile_for(profile, run)).step_time_s


COMPONENTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "expert dispatch": (
        ("counts", "dispatch", "combine", "dispatch_backward", "combine_backward"),
        ("ep_dispatch_combine",),
    ),
    "gradient sync": (
        ("dp_grad_all_reduce", "edp_grad_all_reduce"),
        ("dp_grad_reduce", "dp_param_all_gather"),
    ),
}
"""Communication the runtime times (its collective kinds) and the cost terms that price the same bytes
(their total, not exposed, seconds: the runtime times each collective on its own)."""


def _misfits(profile: ClusterProfile, run: RunRecord) -> list[float]:
    """Log ratios predicted / measured: the step time, then each component both sides have."""
    result = estimate(run.model, run.training, run.parallel, profile_for(profile, run))
    totals = {term.name: term.total_s for term in result.breakdown}
    misfits = [math.log(result.step_time_s / run.measured_step_s)]
    for kinds, terms in COMPONENTS.values():
        measured = sum(run.measured_collectives.get(kind, 0.0) for kind in kinds)
        predicted = sum(totals.get(term, 0.0) for term in terms)
        if measured > 0 and predicted > 0:
            misfits.append(math.log(predicted / measured))
    return misfits


@dataclass(frozen=True, slots=True)
class Knob:
    """One fitted quantity: its value on the profile, its bounds and how a value is written back."""

    name: str
    initial: float
    lower: float
    upper: float
    apply: Callable[[dict[str, Any], float], str]
    """Writes the value into a profile document; returns the sentence appended to the figure's source."""
    additive: bool = False
    """An amount that starts at 0 (the step overhead) rather than a factor on a measured figure."""


def _scale_fractions(knob: str, fields: tuple[str, ...]) -> Callable[[dict[str, Any], float], str]:
    def apply(document: dict[str, Any], factor: float) -> str:
        efficiency = document["gpu"]["efficiency"]
        for field in fields:
            if efficiency.get(field) is not None:
                efficiency[field] = min(1.0, efficiency[field] * factor)
        if "gemm_fraction_bf16" in fields and efficiency.get("gemm_curve_bf16"):
            # A measured curve prices the 16-bit GEMMs in place of the flat fraction: it scales with it.
            efficiency["gemm_curve_bf16"] = [
                [flops, min(1.0, fraction * factor)] for flops, fraction in efficiency["gemm_curve_bf16"]
            ]
        efficiency["source"] += f"; calibrated: {', '.join(fields)} x {factor:.4g} (moeplan calibrate)"
        return knob

    return apply


def _set_step_overhead(document: dict[str, Any], value: float) -> str:
    document["step_overhead_s"] = value
    return "step_overhead_s"


def _speed_up_link(link: str, kinds: Callable[[str], bool]) -> Callable[[dict[str, Any], float], str]:
    """A collective that runs ``factor`` times as fast: bandwidth x factor, latency / factor."""

    def apply(document: dict[str, Any], factor: float) -> str:
        for kind, fit in document["links"][link]["collectives"].items():
            if kinds(kind):
                fit["bandwidth_gbps"] *= factor
                fit["latency_us"] /= factor
                fit["source"] += f"; calibrated: speed x {factor:.4g} (moeplan calibrate)"
        return f"{link} speed"

    return apply


def knobs_for(profile: ClusterProfile, runs: Sequence[RunRecord]) -> list[Knob]:
    """The knobs the runs can inform: efficiencies and step overhead, and the link classes runs send over;
    of those, only the ones that move some run's prediction."""
    knobs: list[Knob] = []
    efficiency = profile.gpu.efficiency
    if efficiency is not None:
        for name, fields in (("gemm_efficiency", GEMM_FIELDS), ("memory_efficiency", MEMORY_FIELDS)):
            top = max(getattr(efficiency, f) or 0.0 for f in fields)
            knobs.append(Knob(name, 1.0, 0.02, 1.0 / top, _scale_fractions(name, fields)))
    knobs.append(
        Knob("step_overhead_s", profile.step_overhead_s, 0.0, 1e3, _set_step_overhead, additive=True)
    )
    baseline = [estimate(run.model, run.training, run.parallel, profile_for(profile, run)) for run in runs]
    crossed = {link for result in baseline for link, size in result.bytes_per_link_class.items() if size > 0}
    for link in sorted(crossed & set(profile.links)):
        # The dispatch's all-to-all gets its own factor: in training it moves many uneven messages per
        # layer, unlike the probe's one large even exchange, while the gradient collectives resemble it.
        dispatch = _speed_up_link(link, lambda kind: kind == "all_to_all")
        others = _speed_up_link(link, lambda kind: kind != "all_to_all")
        knobs.append(Knob(f"{link}_all_to_all_speed", 1.0, 0.02, 50.0, dispatch))
        knobs.append(Knob(f"{link}_collective_speed", 1.0, 0.02, 50.0, others))
    times = [result.step_time_s for result in baseline]
    return [knob for knob in knobs if _visible(profile, knobs, knob, runs, times)]


def _visible(
    profile: ClusterProfile,
    knobs: Sequence[Knob],
    knob: Knob,
    runs: Sequence[RunRecord],
    times: Sequence[float],
) -> bool:
    """Whether moving the knob changes any run's predicted step time (``times``: on ``profile``)."""
    probe = knob.initial + STEP_OVERHEAD_UNIT_S if knob.additive else knob.initial * 0.5
    values = [probe if other is knob else other.initial for other in knobs]
    moved = with_knobs(profile, knobs, values)
    return any(predict(moved, run) != time for run, time in zip(runs, times, strict=True))


def with_knobs(profile: ClusterProfile, knobs: Sequence[Knob], values: Sequence[float]) -> ClusterProfile:
    """The profile with each knob set to its value (knobs at their initial value are left untouched)."""
    document = profile.model_dump(mode="json")
    changed = [
        knob.apply(document, value)
        for knob, value in zip(knobs, values, strict=True)
        if value != knob.initial
    ]
    if changed:
        document["provenance"]["source"] += f"; calibrated by moeplan calibrate ({', '.join(changed)})"
    return validate_spec(ClusterProfile, document, f"calibrated profile '{profile.name}'")


STEP_OVERHEAD_UNIT_S = 0.01
"""The optimizer moves an additive knob as u = log(1 + value / unit): relative above 10 ms, linear
below, so a knob at 0 can move at all (factors move as u = log(value))."""


def _to_u(knob: Knob, value: float) -> float:
    return math.log1p(value / STEP_OVERHEAD_UNIT_S) if knob.additive else math.log(value)


def _from_u(knob: Knob, u: float) -> float:
    value = STEP_OVERHEAD_UNIT_S * math.expm1(u) if knob.additive else math.exp(u)
    return min(knob.upper, max(knob.lower, value))


@dataclass(frozen=True, slots=True)
class Calibration:
    """The fitted profile and the figures that justify it."""

    profile: ClusterProfile
    knobs: tuple[tuple[str, float, float], ...]
    """(name, before, after) per knob."""
    fit_before: tuple[float, ...]
    fit_after: tuple[float, ...]
    """Predicted step times of the fit runs on the profile before and after."""


def calibrate(profile: ClusterProfile, runs: Sequence[RunRecord]) -> Calibration:
    """Fit the knobs to ``runs`` (see the module doc) and return the calibrated profile."""
    from scipy.optimize import least_squares  # heavy: only this command needs it

    knobs = knobs_for(profile, runs)
    u0 = [_to_u(knob, knob.initial) for knob in knobs]
    lower = [_to_u(knob, knob.lower) for knob in knobs]
    upper = [_to_u(knob, knob.upper) for knob in knobs]

    def residuals(u: Sequence[float]) -> list[float]:
        trial = with_knobs(profile, knobs, [_from_u(k, x) for k, x in zip(knobs, u, strict=True)])
        misfit = [value for run in runs for value in _misfits(trial, run)]
        prior = [PRIOR_WEIGHT * (x - x0) for x, x0 in zip(u, u0, strict=True)]
        return misfit + prior

    # Dogbox, not trust-region reflective: several knobs start on a bound (a fraction of 1, an overhead
    # of 0), where trf's scaling freezes them and stops after one step.
    solution = least_squares(residuals, u0, bounds=(lower, upper), method="dogbox")
    values = [_from_u(knob, float(u)) for knob, u in zip(knobs, solution.x, strict=True)]
    calibrated = with_knobs(profile, knobs, values)
    return Calibration(
        profile=calibrated,
        knobs=tuple((knob.name, knob.initial, value) for knob, value in zip(knobs, values, strict=True)),
        fit_before=tuple(predict(profile, run) for run in runs),
        fit_after=tuple(predict(calibrated, run) for run in runs),
    )


def mean_absolute_error(predicted: Sequence[float], runs: Sequence[RunRecord]) -> float:
    """Mean of |predicted / measured - 1| over the runs."""
    return statistics.fmean(abs(p / run.measured_step_s - 1) for p, run in zip(predicted, runs, strict=True))
