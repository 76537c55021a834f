"""``--what-if FIELD=VALUE``: a cluster profile with some figures changed, to see how a plan responds.

Two kinds of FIELD:

- shorthands for the questions people ask most, each a documented rule over several fields:

  - ``inter_node_gbps`` / ``intra_node_gbps``: the link class's line rate (``nominal_gbps``) becomes
    VALUE, and every collective's fitted bandwidth scales by the same factor, so the measured fraction
    of line rate (protocol overhead, NCCL's algorithm efficiency) is kept;
  - ``inter_node_latency_us`` / ``intra_node_latency_us``: every collective's latency on that class;
  - ``hbm_gib``, ``hbm_gbps``, ``peak_tflops_bf16``, ``peak_tflops_fp8``, ``gemm_fraction_bf16``:
    the GPU's memory size and bandwidth, dense peaks, and sustained GEMM fraction;
  - ``host_overhead_us``: host time per launched kernel;

- any dotted path of the profile document (``moeplan show cluster NAME --json`` shows them), e.g.
  ``links.inter_node.collectives.all_to_all.bandwidth_gbps=50`` or ``gpu.num_sms=132``.

The changed profile is validated by the schema like any profile file, so a value that breaks a rule
(a negative bandwidth, a fraction above 1) is one error paragraph. Its provenance records the changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import yaml

from planner.errors import SpecError
from planner.schema import ClusterProfile
from planner.specfiles import suggest, validate_spec

__all__ = ["SHORTHANDS", "apply_what_if", "parse_assignment"]


def _scale_link(link: str) -> Callable[[dict[str, Any], float], None]:
    def apply(profile: dict[str, Any], value: float) -> None:
        cls = _link(profile, link)
        factor = value / cls["nominal_gbps"]
        cls["nominal_gbps"] = value
        for fit in cls["collectives"].values():
            fit["bandwidth_gbps"] *= factor

    return apply


def _set_latency(link: str) -> Callable[[dict[str, Any], float], None]:
    def apply(profile: dict[str, Any], value: float) -> None:
        for fit in _link(profile, link)["collectives"].values():
            fit["latency_us"] = value

    return apply


def _set_path(*path: str) -> Callable[[dict[str, Any], float], None]:
    return lambda profile, value: _set_dotted(profile, ".".join(path), value)


def _link(profile: dict[str, Any], link: str) -> dict[str, Any]:
    links: dict[str, Any] = profile["links"]
    if link not in links:
        raise SpecError(f"--what-if: cluster '{profile['name']}' has no {link} link class to change")
    cls: dict[str, Any] = links[link]
    return cls


SHORTHANDS: dict[str, Callable[[dict[str, Any], float], None]] = {
    "inter_node_gbps": _scale_link("inter_node"),
    "intra_node_gbps": _scale_link("intra_node"),
    "inter_node_latency_us": _set_latency("inter_node"),
    "intra_node_latency_us": _set_latency("intra_node"),
    "hbm_gib": _set_path("gpu", "hbm_gib"),
    "hbm_gbps": _set_path("gpu", "hbm_gbps"),
    "peak_tflops_bf16": _set_path("gpu", "peak_tflops", "bf16"),
    "peak_tflops_fp8": _set_path("gpu", "peak_tflops", "fp8"),
    "gemm_fraction_bf16": _set_path("gpu", "efficiency", "gemm_fraction_bf16"),
    "host_overhead_us": _set_path("host_overhead_us"),
}
"""The named questions; anything else must be a dotted path of the profile."""


def parse_assignment(text: str) -> tuple[str, Any]:
    """``FIELD=VALUE`` with VALUE read as a YAML scalar (so ``100`` is a number, ``true`` a boolean)."""
    field, sep, raw = text.partition("=")
    if not sep or not field.strip() or not raw.strip():
        raise SpecError(f"--what-if '{text}' must be FIELD=VALUE, e.g. inter_node_gbps=100")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return field.strip(), value


def _set_dotted(document: dict[str, Any], field: str, value: Any) -> None:
    node: Any = document
    keys = field.split(".")
    for depth, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            known = sorted(node) if isinstance(node, dict) else []
            where = ".".join(keys[:depth]) or "the profile"
            names = known + (sorted(SHORTHANDS) if depth == 0 else [])
            raise SpecError(
                f"--what-if field '{field}': {where} has no '{key}'; {suggest(key, names)} Give a shorthand "
                f"({', '.join(sorted(SHORTHANDS))}) or a dotted path of the profile document."
            )
        if depth == len(keys) - 1:
            node[key] = value
        node = node[key]


def apply_what_if(profile: ClusterProfile, assignments: Sequence[tuple[str, Any]]) -> ClusterProfile:
    """The profile with each ``(field, value)`` applied in order, validated; provenance records them."""
    document = profile.model_dump(mode="json")
    for field, value in assignments:
        if field in SHORTHANDS:
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise SpecError(f"--what-if {field}={value!r}: the value must be a positive number")
            SHORTHANDS[field](document, float(value))
        else:
            _set_dotted(document, field, value)
    said = ", ".join(f"{field}={value}" for field, value in assignments)
    document["provenance"]["source"] = f"{document['provenance']['source']}; what-if: {said}"
    return validate_spec(ClusterProfile, document, f"cluster '{profile.name}' with --what-if {said}")
