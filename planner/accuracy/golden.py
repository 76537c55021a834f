"""``moeplan check``: re-solve regression cases and compare with the plans kept in version control.

A case (``*.check.yaml``, format ``moeplan-check/1``, see ``planner.schema.golden``) names the inputs of
one solve and its expected plan. A case passes when the new plan has the identical layout (every
degree and option of ``parallel``, the world size, the training settings) and its predicted step time
moved by at most the case's tolerance. Otherwise the outcome lists each changed field with old and new
value, and by how much the predicted time moved, so a reviewer sees what a cost-model, profile or
moeplan change did to the plan without running anything.

Expected plans are compared in ``emit_plan_json``'s stable form (wall-clock zeroed, floats to 6
significant digits), the same bytes ``--update`` writes, so a case's file only changes when the plan does.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from xml.etree import ElementTree

from planner.catalog import resolve_cluster, resolve_model
from planner.emit import emit_plan_json, load_plan, write_plan
from planner.errors import InfeasiblePlanError, SpecError
from planner.schema import Plan
from planner.schema.golden import CHECK_FORMAT, CheckCase
from planner.search import SearchOptions, solve
from planner.search.space import recompute_choices
from planner.specfiles import atomic_write_text, read_tagged_mapping, validate_spec
from planner.units import GIB

__all__ = [
    "CASE_SUFFIX",
    "CaseOutcome",
    "FieldChange",
    "check_case",
    "find_cases",
    "junit_xml",
    "load_case",
]

CASE_SUFFIX = ".check.yaml"
"""How case files are found in a folder."""

Status = Literal["pass", "regression", "updated"]


@dataclass(frozen=True, slots=True)
class FieldChange:
    """One field of the plan that differs: dotted path, expected value, new value."""

    field: str
    expected: Any
    actual: Any


@dataclass(frozen=True, slots=True)
class CaseOutcome:
    """What one case came to."""

    path: Path
    description: str | None
    status: Status
    changes: tuple[FieldChange, ...] = ()
    """Layout and setting fields that changed (empty when the layout is identical)."""
    expected_step_time_s: float | None = None
    actual_step_time_s: float | None = None
    tolerance: float = 0.0
    notes: tuple[str, ...] = field(default=())
    """Further lines for people: memory, proofs, what was written."""
    seconds: float = 0.0
    """Wall time of the case (solve included)."""

    @property
    def relative_change(self) -> float | None:
        """Signed relative change of the predicted step time, when both plans have one."""
        if not self.expected_step_time_s or self.actual_step_time_s is None:
            return None
        return self.actual_step_time_s / self.expected_step_time_s - 1

    def summary(self) -> list[str]:
        """The readable diff: one line per changed field, then the step time, then notes."""
        lines = [f"{c.field}: {_show(c.expected)} -> {_show(c.actual)}" for c in self.changes]
        change = self.relative_change
        if change is not None:
            assert self.expected_step_time_s is not None and self.actual_step_time_s is not None
            verdict = "within" if abs(change) <= self.tolerance else "beyond"
            lines.append(
                f"predicted step time: {self.expected_step_time_s:.6g} s -> {self.actual_step_time_s:.6g} s "
                f"({change:+.2%}; {verdict} the tolerance of {self.tolerance:.2%})"
            )
        return lines + list(self.notes)

    def to_json(self) -> dict[str, Any]:
        return {
            "case": str(self.path),
            "description": self.description,
            "status": self.status,
            "changes": [{"field": c.field, "expected": c.expected, "actual": c.actual} for c in self.changes],
            "expected_step_time_s": self.expected_step_time_s,
            "actual_step_time_s": self.actual_step_time_s,
            "relative_change": self.relative_change,
            "tolerance": self.tolerance,
            "notes": list(self.notes),
        }


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def find_cases(paths: Iterable[Path]) -> list[Path]:
    """Case files: a folder gives every ``*.check.yaml`` under it (sorted); a file is taken as it is."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob(f"*{CASE_SUFFIX}") if p.is_file()))
        elif path.is_file():
            found.append(path)
        else:
            raise SpecError(
                f"check path '{path}' does not exist: give case files or folders holding *{CASE_SUFFIX}"
            )
    if not found:
        shown = ", ".join(f"'{p}'" for p in paths)
        raise SpecError(f"no case files (*{CASE_SUFFIX}) under {shown}: nothing to check")
    return list(dict.fromkeys(found))


def load_case(path: Path) -> CheckCase:
    """A case file, validated; a file of another format is refused with its format named."""
    data = read_tagged_mapping(path, "check case", CHECK_FORMAT)
    return validate_spec(CheckCase, data, f"check case '{path}'")


def _relative_to_case(value: str, case_path: Path) -> str:
    """A file path in a case is relative to the case's folder; a bundled name stays a name."""
    is_file = Path(value).suffix in {".yaml", ".yml", ".json"} or "/" in value
    return str(case_path.parent / value) if is_file and not Path(value).is_absolute() else value


def solve_case(case: CheckCase, case_path: Path) -> Plan | None:
    """The plan the case's inputs give today (stable form), or None when no layout fits."""
    model, model_ref = resolve_model(_relative_to_case(case.model, case_path))
    resolved = resolve_cluster(_relative_to_case(case.cluster, case_path), case.nodes)
    # A file is recorded as the case names it: relative to the case's folder, where its plan is kept.
    if model_ref.source == "file":
        model_ref = model_ref.model_copy(update={"path": case.model})
    cluster_ref = resolved.ref
    if cluster_ref.source == "file":
        cluster_ref = cluster_ref.model_copy(update={"path": case.cluster})
    search = case.search
    options = SearchOptions(
        topology_aware_routing=search.topology_aware_routing,
        condense_fraction=search.condense_fraction,
        sequence_migration=search.sequence_migration,
        framework=search.framework,
        memory_margin=search.memory_margin,
        fixed=tuple(search.fixed.items()),
        maxima=tuple(search.maxima.items()),
        recompute=recompute_choices(search.recompute),
    )
    if search.dispatchers:
        options = replace(options, dispatchers=tuple(sorted(set(search.dispatchers))), dispatchers_named=True)
    try:
        result = solve(
            model,
            case.training,
            resolved.profile,
            options,
            time_limit_s=search.time_limit_s,
            exhaustive=search.exhaustive,
            model_ref=model_ref,
            cluster_ref=cluster_ref,
        )
    except InfeasiblePlanError:
        return None
    plan = result.plan
    # Round-trip through the stable form: the comparison sees exactly what --update would write.
    return Plan.model_validate_json(emit_plan_json(plan, stable=True))


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key in sorted(value):
            flat |= _flatten(f"{prefix}.{key}" if prefix else key, value[key])
        return flat
    return {prefix: value}


def layout_changes(expected: Plan, actual: Plan) -> tuple[FieldChange, ...]:
    """Every field of the layout (parallel), world size and training settings that differs."""

    def fields(plan: Plan) -> dict[str, Any]:
        return (
            {"num_gpus": plan.num_gpus}
            | _flatten("", plan.parallel.model_dump(mode="json"))
            | _flatten("training", plan.training.model_dump(mode="json"))
        )

    old, new = fields(expected), fields(actual)
    return tuple(
        FieldChange(name, old.get(name), new.get(name))
        for name in sorted(old.keys() | new.keys())
        if old.get(name) != new.get(name)
    )


def _memory_note(expected: Plan, actual: Plan) -> list[str]:
    if expected.estimate is None or actual.estimate is None:
        return []
    old, new = expected.estimate.peak_memory_bytes, actual.estimate.peak_memory_bytes
    if old == new:
        return []
    return [f"peak memory per GPU: {old / GIB:.2f} GiB -> {new / GIB:.2f} GiB"]


def compare(case: CheckCase, path: Path, expected: Plan | None, actual: Plan | None) -> CaseOutcome:
    """Pass or regression, with the readable diff."""
    old_time = expected.estimate.step_time_s if expected and expected.estimate else None
    new_time = actual.estimate.step_time_s if actual and actual.estimate else None
    base = CaseOutcome(
        path=path, description=case.description, status="pass", tolerance=case.tolerance,
        expected_step_time_s=old_time, actual_step_time_s=new_time,
    )  # fmt: skip
    if expected is None and actual is None:
        return replace(base, notes=("no layout fits, as expected",))
    if expected is None:
        return replace(
            base, status="regression", notes=("expected no layout to fit, but the solver now finds a plan",)
        )
    if actual is None:
        return replace(
            base,
            status="regression",
            notes=("no layout fits any more (the expected plan is now infeasible)",),
        )
    changes = layout_changes(expected, actual)
    outcome = replace(base, changes=changes, notes=tuple(_memory_note(expected, actual)))
    moved = outcome.relative_change
    regressed = bool(changes) or old_time is None or (moved is not None and abs(moved) > case.tolerance)
    return replace(outcome, status="regression") if regressed else outcome


def _with_status(outcome: CaseOutcome, status: Status, *notes: str) -> CaseOutcome:
    return replace(outcome, status=status, notes=outcome.notes + notes)


def expected_path(case: CheckCase, case_path: Path) -> Path | None:
    """The case's expected plan: a file in the case's folder or below it (``--update`` writes it, so a
    case file may not point it elsewhere: ``../../etc/x`` or an absolute path is refused)."""
    if case.expected is None:
        return None
    folder = case_path.parent.resolve()
    target = (folder / case.expected).resolve()
    if not target.is_relative_to(folder) or target == folder:
        raise SpecError(
            f"check case '{case_path}': expected ({case.expected!r}) must name a plan file in the case's folder "
            "or below it"
        )
    return case_path.parent / case.expected


def check_case(path: Path, case: CheckCase, *, update: bool = False) -> CaseOutcome:
    """Solve one case and compare it with its expected plan.

    With ``update`` a changed (or missing) expected plan is rewritten and the case reports ``updated``;
    whether a case expects a plan at all is the case file's statement, so a case that became
    (in)feasible stays a regression until a person edits it.
    """
    start = time.perf_counter()
    target = expected_path(case, path)
    expected: Plan | None = None
    if target is not None:
        if target.exists():
            expected = load_plan(target)
        elif not update:
            raise SpecError(
                f"check case '{path}': expected plan '{target}' does not exist; "
                "run `moeplan check --update` to write it from today's solve"
            )
    actual = solve_case(case, path)
    if expected is None and target is not None and actual is not None:
        outcome = CaseOutcome(
            path=path, description=case.description, status="pass", tolerance=case.tolerance
        )
    else:
        outcome = compare(case, path, expected, actual)
    # Both plans are in the stable form (the expected one as read, today's round-tripped through it), so
    # comparing them is comparing the bytes --update would write; a file of an older plan schema
    # (migrated when read) is rewritten in the current one.
    if update and target is not None and actual is not None:
        stale = actual != expected or target.read_bytes() != emit_plan_json(actual, stable=True).encode()
        if stale:
            write_plan(target, actual, stable=True)
            outcome = _with_status(outcome, "updated", f"wrote {target}")
    return replace(outcome, seconds=time.perf_counter() - start)


def junit_xml(outcomes: Sequence[CaseOutcome]) -> str:
    """A JUnit XML report (one testcase per case; a regression is a failure with the diff as its text)."""
    failures = sum(o.status == "regression" for o in outcomes)
    suite = ElementTree.Element(
        "testsuite",
        name="moeplan check",
        tests=str(len(outcomes)),
        failures=str(failures),
        errors="0",
        time=f"{sum(o.seconds for o in outcomes):.3f}",
    )
    for outcome in outcomes:
        case = ElementTree.SubElement(
            suite,
            "testcase",
            classname="moeplan.check",
            name=str(outcome.path),
            time=f"{outcome.seconds:.3f}",
        )
        if outcome.status == "regression":
            failure = ElementTree.SubElement(case, "failure", message="plan regression", type="regression")
            failure.text = "\n".join(outcome.summary())
        elif outcome.summary():
            out = ElementTree.SubElement(case, "system-out")
            out.text = "\n".join(outcome.summary())
    suites = ElementTree.Element("testsuites")
    suites.append(suite)
    ElementTree.indent(suites)
    return ElementTree.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def write_junit(path: Path, outcomes: Sequence[CaseOutcome]) -> None:
    atomic_write_text(path, junit_xml(outcomes))
