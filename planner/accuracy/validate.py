"""Score the cost model against a file of published measurements (``moeplan validate``).

For every case: the estimate of its configuration on its cluster, the measured metric, the signed
error; for every group of two or more cases: Kendall's tau-b between predicted and measured values
and whether the best measured configuration is also predicted best. GPUs of the file carry only
datasheet peaks; their achieved fractions (``ComputeEfficiency``) come from the hardware catalog's
GPU of the same name (``H800`` matches ``H800-SXM``), or the cost model's H100 defaults.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from planner.accuracy.validation_file import (
    CaseInputs,
    Metric,
    ValidationSuite,
    best_indices,
    case_inputs,
    kendall_tau,
    mape,
    pairwise_agreement,
    signed_error,
    top1_match,
)
from planner.catalog import gpu_names, load_gpu
from planner.costmodel import estimate
from planner.costmodel.memory import memory_coefficients, rank_memory, split_layers
from planner.costmodel.routing import layout_imbalance
from planner.errors import SpecError
from planner.schema import ClusterRef, Estimate, GpuSpec, ModelRef
from planner.units import GIB

__all__ = [
    "CaseResult",
    "GroupResult",
    "GroupSolution",
    "ValidationReport",
    "catalog_efficiency",
    "solve_groups",
    "validate_suite",
    "with_catalog_efficiency",
]


@dataclass(frozen=True, slots=True)
class CaseResult:
    id: str
    group: str
    metric: Metric
    predicted: float
    measured: float | None
    error: float | None
    fits: bool
    estimate: Estimate
    ran: bool = True
    """The run completed (its outcome is not ``oom``)."""
    measured_peak_gib: float | None = None
    """The peak memory per GPU the source reports, GiB, when it reports one."""
    reported_rank_gib: float | None = None
    """The predicted allocated peak of the pipeline rank the source reports when that is not the busiest
    (``Measured.peak_memory_rank``), GiB."""
    fits_if_unstated: bool | None = None
    """For a run that ran yet is predicted not to fit: whether it fits with the gradient and optimizer
    precision the source leaves open at their lightest (``case_inputs(lightest=True)``); None otherwise."""

    @property
    def predicted_peak_gib(self) -> float:
        return self.estimate.peak_memory_bytes / GIB

    @property
    def predicted_allocated_gib(self) -> float:
        """The predicted peak less the reserve (CUDA context, NCCL, allocator cache): what PyTorch's
        ``max_memory_allocated`` counts, the statistic Megatron-LM and Megatron-Bridge print."""
        reserve = self.estimate.memory.reserve if self.estimate.memory is not None else 0.0
        return (self.estimate.peak_memory_bytes - reserve) / GIB

    @property
    def memory_error(self) -> float | None:
        """Relative error of the predicted allocated peak (of the rank the source reports), when a peak
        was measured."""
        if self.measured_peak_gib is None:
            return None
        predicted = (
            self.reported_rank_gib if self.reported_rank_gib is not None else self.predicted_allocated_gib
        )
        return signed_error(predicted, self.measured_peak_gib)

    @property
    def false_oom(self) -> bool:
        """Predicted out of memory, but the run ran, even with the settings the source leaves open at
        their lightest."""
        return self.ran and not self.fits and not self.fits_if_unstated

    @property
    def oom_unless_unstated(self) -> bool:
        """Ran, and fits only with settings the source leaves open at their lightest (not a false OOM:
        the format asks to treat a null as uncertain)."""
        return self.ran and not self.fits and bool(self.fits_if_unstated)

    @property
    def missed_oom(self) -> bool:
        """Predicted to fit, but the run ran out of memory."""
        return not self.ran and self.fits


@dataclass(frozen=True, slots=True)
class GroupResult:
    group: str
    case_ids: tuple[str, ...]
    kendall_tau: float
    top1_match: bool
    pairs_right: float = 0.0
    """Pairs of cases with different measured values that the prediction orders as measured (a tie: half)."""
    pairs: int = 0

    @property
    def pairwise_accuracy(self) -> float:
        """Share of the group's measured orderings the prediction gets right (NaN without a pair)."""
        return self.pairs_right / self.pairs if self.pairs else math.nan


@dataclass(frozen=True, slots=True)
class ValidationReport:
    cases: tuple[CaseResult, ...]
    groups: tuple[GroupResult, ...]
    mape: float

    @property
    def false_oom(self) -> tuple[str, ...]:
        """Cases that ran but are predicted out of memory: the plans the solver would wrongly refuse."""
        return tuple(c.id for c in self.cases if c.false_oom)

    @property
    def oom_unless_unstated(self) -> tuple[str, ...]:
        """Cases that ran and fit only with the settings their source leaves open at their lightest."""
        return tuple(c.id for c in self.cases if c.oom_unless_unstated)

    @property
    def missed_oom(self) -> tuple[str, ...]:
        """Cases that ran out of memory but are predicted to fit."""
        return tuple(c.id for c in self.cases if c.missed_oom)

    @property
    def top1_groups(self) -> tuple[int, int]:
        """(groups whose best measured configuration is predicted best, groups ranked)."""
        return sum(g.top1_match for g in self.groups), len(self.groups)

    @property
    def pairs(self) -> int:
        """Pairs of measured configurations compared, over all groups."""
        return sum(g.pairs for g in self.groups)

    @property
    def pairwise_accuracy(self) -> float:
        """Share of all measured pairwise orderings, within groups, that the prediction gets right."""
        return sum(g.pairs_right for g in self.groups) / self.pairs if self.pairs else math.nan

    @property
    def memory_mape(self) -> float | None:
        """Mean absolute relative error of the predicted peak memory over the cases that report one."""
        errors = [c.memory_error for c in self.cases if c.memory_error is not None]
        return mape(errors) if errors else None


def catalog_efficiency(gpu: GpuSpec) -> GpuSpec:
    """The GPU with the catalog's measured fractions, SM count and (unless stated) compute capability when a
    catalog GPU of its name exists."""
    if gpu.efficiency is not None or gpu.name is None:
        return gpu
    names = [
        n
        for n in gpu_names()
        if n.lower() == gpu.name.lower() or n.lower().startswith(gpu.name.lower() + "-")
    ]
    if not names:
        return gpu
    try:
        known = load_gpu(names[0])
    except SpecError:
        return gpu
    return gpu.model_copy(
        update={
            "efficiency": known.efficiency,
            "num_sms": gpu.num_sms or known.num_sms,
            "compute_capability": gpu.compute_capability or known.compute_capability,
        }
    )


def with_catalog_efficiency(suite: ValidationSuite) -> ValidationSuite:
    """The suite with every GPU given the catalog's measured fractions (``catalog_efficiency``)."""
    return suite.model_copy(update={"gpus": {k: catalog_efficiency(g) for k, g in suite.gpus.items()}})


def _last_rank_allocated(inputs: CaseInputs) -> float:
    """Predicted bytes the last pipeline rank allocates at its peak (the reserve left out)."""
    model, training, parallel = inputs.model, inputs.training, inputs.parallel
    coeffs = memory_coefficients(model, training, parallel, layout_imbalance(model, training, parallel))
    dense, moe = split_layers(model, parallel)[-1]
    held = rank_memory(coeffs, parallel.pp - 1, dense, moe)
    return held.total - held.reserve


def validate_suite(suite: ValidationSuite) -> ValidationReport:
    """Predict every case and score the predictions."""
    suite = with_catalog_efficiency(suite)
    results: list[CaseResult] = []
    for case in suite.cases:
        inputs = case_inputs(suite, case)
        predicted_case = estimate(inputs.model, inputs.training, inputs.parallel, inputs.cluster)
        metric = case.measured.metric
        predicted = float(getattr(predicted_case, metric))
        measured = case.measured.value
        error = signed_error(predicted, measured) if measured is not None else None
        ran = case.measured.outcome != "oom"
        open_fits = None
        if ran and not predicted_case.fits:
            light = case_inputs(suite, case, lightest=True)
            open_fits = estimate(light.model, light.training, light.parallel, light.cluster).fits
        reported = None
        if case.measured.peak_memory_rank == "last":
            reported = _last_rank_allocated(inputs) / GIB
        results.append(
            CaseResult(
                case.id, case.group, metric, predicted, measured, error, predicted_case.fits, predicted_case,
                ran=ran, measured_peak_gib=case.measured.peak_memory_gib, fits_if_unstated=open_fits,
                reported_rank_gib=reported,
            )
        )  # fmt: skip
    by_group: dict[str, list[CaseResult]] = defaultdict(list)
    for result in results:
        by_group[result.group].append(result)
    groups = []
    for name, members in by_group.items():
        scored = [m for m in members if m.measured is not None]
        if len(members) < 2 or len({m.metric for m in members}) != 1:
            continue
        metric = members[0].metric
        scored_predicted = [m.predicted for m in scored]
        scored_measured = [m.measured for m in scored if m.measured is not None]
        tau = kendall_tau(scored_predicted, scored_measured)
        match = top1_match([m.predicted for m in members], [m.measured for m in members], metric)
        right, pairs = pairwise_agreement(scored_predicted, scored_measured)
        groups.append(GroupResult(name, tuple(m.id for m in members), tau, match, right, pairs))
    errors = [r.error for r in results if r.error is not None]
    return ValidationReport(tuple(results), tuple(groups), mape(errors) if errors else math.nan)


@dataclass(frozen=True, slots=True)
class GroupSolution:
    """The solver's plan for a group's model, cluster and training, against its best measured case."""

    group: str
    solver_plan: dict[str, object]
    solver_predicted: float
    """Predicted step seconds of the solver's plan."""
    best_measured_predicted: float
    """Predicted step seconds of the group's best measured configuration."""
    best_measured_fits: bool
    """Whether the cost model thinks the best measured configuration fits in memory."""


def solve_groups(
    suite: ValidationSuite, report: ValidationReport, progress: Callable[[int, int, str], None] | None = None
) -> list[GroupSolution]:
    """Solve each group's model, cluster and training (those of its best measured case).

    ``progress`` hears ``(groups solved, groups, what)`` before each group and once all are solved.

    The solver searches the same cost model, so its plan is never predicted slower than the best
    measured configuration when that configuration lies in its search space and fits in memory.
    """
    from planner.search import solve  # PuLP only when asked for

    suite = with_catalog_efficiency(suite)
    cases = {case.id: case for case in suite.cases}
    by_group: dict[str, list[CaseResult]] = defaultdict(list)
    for result in report.cases:
        if result.measured is not None:
            by_group[result.group].append(result)
    solutions = []
    for done, (group, members) in enumerate(by_group.items()):
        if progress is not None:
            progress(done, len(by_group), f"group {done + 1} of {len(by_group)}: solving '{group}'")
        metric = members[0].metric
        best_index = min(best_indices([m.measured for m in members], metric))
        best = members[best_index]
        inputs = case_inputs(suite, cases[best.id])
        plan = solve(
            inputs.model,
            inputs.training,
            inputs.cluster,
            model_ref=ModelRef(name=inputs.model.name or cases[best.id].model, source="derived"),
            cluster_ref=ClusterRef(name=inputs.cluster.name, source="derived"),
        ).plan
        assert plan.estimate is not None
        solutions.append(
            GroupSolution(
                group=group,
                solver_plan=plan.parallel.model_dump(mode="json"),
                solver_predicted=plan.estimate.step_time_s,
                best_measured_predicted=best.estimate.step_time_s,
                best_measured_fits=best.estimate.fits,
            )
        )
    if progress is not None:
        progress(len(by_group), len(by_group), f"done: {len(by_group)} of {len(by_group)} groups solved")
    return solutions
