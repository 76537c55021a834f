"""Plan <-> canonical JSON: the plan document ``moeplan solve`` writes and every other emitter reads.

Canonical means: keys sorted, 2-space indent, ASCII only, one trailing newline, every field present
(``null`` where unset). The same Plan always gives the same bytes, so ``emit_plan_json(load_plan(p))``
reproduces the file ``p`` it came from.

Neither form holds wall-clock time: ``solver.solve_time_s`` is written as 0 (a solve never takes the
same time twice, and the same inputs must give byte-identical plan files); ``solve`` shows the time in
its report. Two forms:

- the default form holds every other value exactly as the Plan has it, so ``load_plan`` returns an equal
  Plan but for the solve time;
- ``stable=True`` is the golden-file form. It also rounds every float to 6 significant digits, so that a
  last-bit difference in a cost term (another BLAS, another CPU) does not change the file. It still
  loads as a Plan. Compare golden files in this form.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from planner.catalog import catalog_names, cluster_names, find_file, resolve_cluster, resolve_model
from planner.errors import SpecError
from planner.schema import ClusterProfile, ClusterRef, ModelRef, Plan
from planner.specfiles import atomic_write_text, read_mapping, validate_spec

__all__ = ["FLOAT_SIGNIFICANT_DIGITS", "emit_plan_json", "load_plan", "migrate_v1", "write_plan"]

FLOAT_SIGNIFICANT_DIGITS = 6
"""Significant digits kept for floats in the stable (golden-file) form."""

WALL_CLOCK_FIELDS: tuple[tuple[str, ...], ...] = (("solver", "solve_time_s"),)
"""Paths of fields that measure elapsed time, zeroed in every written form."""


def _round_floats(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.{FLOAT_SIGNIFICANT_DIGITS}g}")
    if isinstance(value, dict):
        return {key: _round_floats(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_round_floats(item) for item in value]
    return value


def _zero_wall_clock(document: dict[str, Any]) -> None:
    for *parents, leaf in WALL_CLOCK_FIELDS:
        node: Any = document
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[leaf] = 0.0


def emit_plan_json(plan: Plan, *, stable: bool = False) -> str:
    """The plan as canonical JSON text, its wall-clock time zeroed; ``stable=True`` gives the golden-file
    form (see the module doc)."""
    document: dict[str, Any] = plan.model_dump(mode="json")
    _zero_wall_clock(document)
    if stable:
        document = _round_floats(document)
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=True, allow_nan=False) + "\n"


def load_plan(path: Path | str) -> Plan:
    """Read a plan document (JSON, or the same fields in YAML); a bad file raises one-paragraph SpecError.

    A version 1 plan is migrated (``migrate_v1``) when its inputs can still be found; a version 2 plan
    gains ``parallel.optimizer`` with Megatron-LM's defaults (FP32 gradients and Adam state on the GPU),
    the settings every version 2 plan was priced and emitted with.
    """
    path = Path(path)
    data = read_mapping(path, "plan")
    if data.get("schema_version") == 1:
        data = migrate_v1(data, path)
    if data.get("schema_version") == 2:
        data = {**data, "schema_version": 3}
    return validate_spec(Plan, data, f"plan file '{path}'")


def migrate_v1(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """A version 1 plan document as version 2 (read on as version 3 by ``load_plan``): where its model and
    cluster came from, and its node shape.

    Version 1 named the model and the cluster by one string each and did not record the node shape.
    The migration reads them as ``moeplan solve`` would have: a catalog model or a bundled profile by
    name (the node shape is the bundled profile's GPUs per node); a file as given, or relative to the plan
    file's folder, recorded with the hash of its bytes today. A cluster that is neither (a probed
    profile's name) has no node shape to recover: the plan must be solved again.
    """
    model, cluster, world = data.get("model"), data.get("cluster"), data.get("num_gpus")
    if not isinstance(model, str) or not isinstance(cluster, str) or not isinstance(world, int) or world < 1:
        return data  # not a well-formed version 1 plan: validation names what is wrong
    where = f"plan file '{path}' (schema_version 1)"
    try:
        model_ref = _v1_model(model, path.parent)
        profile, cluster_ref = _v1_cluster(cluster, path.parent)
    except SpecError as exc:
        raise SpecError(
            f"{where} cannot be migrated to version 2: {exc} Solve it again with this moeplan "
            "(moeplan solve ... -o FILE) to get a plan that records its node shape."
        ) from None
    per_node = min(profile.num_gpus_per_node, world)
    if world % per_node:
        raise SpecError(
            f"{where}: num_gpus ({world}) is not a whole number of '{profile.name}' nodes of {per_node} GPUs; "
            "solve it again with this moeplan."
        )
    return {
        **data,
        "schema_version": 2,
        "model": model_ref.model_dump(mode="json"),
        "cluster": cluster_ref.model_dump(mode="json"),
        "num_nodes": world // per_node,
        "num_gpus_per_node": per_node,
    }


def _found(name: str, plan_dir: Path, what: str, names: list[str]) -> str:
    """A catalog name as it is, or the file it names (as given, or beside the plan)."""
    if name.lower() in {n.lower() for n in names}:
        return name
    found = find_file(name, plan_dir)
    if found is None:
        raise SpecError(f"its {what} '{name}' is neither a bundled name nor a file here or beside the plan.")
    return str(found)


def _v1_model(name: str, plan_dir: Path) -> ModelRef:
    _, ref = resolve_model(_found(name, plan_dir, "model", catalog_names()))
    return ref.model_copy(update={"path": name}) if ref.source == "file" else ref  # as the plan wrote it


def _v1_cluster(name: str, plan_dir: Path) -> tuple[ClusterProfile, ClusterRef]:
    resolved = resolve_cluster(_found(name, plan_dir, "cluster", cluster_names()))
    ref = resolved.ref
    return resolved.profile, ref.model_copy(update={"path": name}) if ref.source == "file" else ref


def write_plan(path: Path | str, plan: Plan, *, stable: bool = False) -> None:
    """Write the plan's canonical JSON to ``path`` atomically (a reader never sees half a file)."""
    atomic_write_text(Path(path), emit_plan_json(plan, stable=stable))
