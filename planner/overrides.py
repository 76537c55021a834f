"""Changing documents by dotted path: ``--what-if FIELD=VALUE`` on a cluster profile (to see how a plan
responds to other hardware) and ``--set FIELD=VALUE`` on a plan (``moeplan estimate --plan``, ``run``).

Two kinds of ``--what-if`` FIELD:

- shorthands for the questions people ask most, each a documented rule over several fields:

  - ``inter_node_gbps`` / ``intra_node_gbps``: the link class's line rate (``nominal_gbps``) becomes
    VALUE, and every collective's fitted bandwidth scales by the same factor, so the measured fraction
    of line rate (protocol overhead, NCCL's algorithm efficiency) is kept;
  - ``inter_node_latency_us`` / ``intra_node_latency_us``: every collective's latency on that class;
  - ``hbm_gib``, ``hbm_gbps``, ``peak_tflops_bf16``, ``peak_tflops_fp8``, ``gemm_fraction_bf16``:
    the GPU's memory size and bandwidth, dense peaks, and sustained GEMM fraction (which then prices
    every GEMM: a GPU's measured curve, ``gemm_curve_bf16``, is set aside, since the question is "what if
    GEMMs ran at this fraction");
  - ``host_overhead_us``: host time per launched kernel;

- any dotted path of the profile document (``moeplan show cluster NAME --json`` shows them), e.g.
  ``links.inter_node.collectives.all_to_all.bandwidth_gbps=50`` or ``gpu.num_sms=132``.

The changed profile is validated by the schema like any profile file, so a value that breaks a rule
(a negative bandwidth, a fraction above 1) is one error paragraph. Its provenance records the changes.

``--set`` takes any dotted path under the plan's ``parallel`` and ``training`` (``moeplan schema plan``
lists them); the commands' common flags (``--tp``, ``--dispatcher``, ...) are shorthands for such
paths (``override_plan``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import yaml
from pydantic import ValidationError

from planner.errors import SpecError
from planner.schema import ClusterProfile, ParallelConfig, Plan
from planner.specfiles import format_validation_error, suggest, validate_spec

__all__ = [
    "PIPELINE_FIELDS",
    "SHORTHANDS",
    "apply_what_if",
    "delay_follows_overlap",
    "override_plan",
    "parse_assignment",
    "set_dotted",
]


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
    return lambda profile, value: set_dotted(profile, ".".join(path), value, flag="--what-if", what="profile")


def _set_gemm_fraction(profile: dict[str, Any], value: float) -> None:
    _set_path("gpu", "efficiency", "gemm_fraction_bf16")(profile, value)
    profile["gpu"]["efficiency"]["gemm_curve_bf16"] = None  # the flat figure asked about prices every GEMM


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
    "gemm_fraction_bf16": _set_gemm_fraction,
    "host_overhead_us": _set_path("host_overhead_us"),
}
"""The named questions; anything else must be a dotted path of the profile."""


def parse_assignment(
    text: str, flag: str = "--what-if", example: str = "inter_node_gbps=100"
) -> tuple[str, Any]:
    """``FIELD=VALUE`` with VALUE read as a YAML scalar (so ``100`` is a number, ``true`` a boolean)."""
    field, sep, raw = text.partition("=")
    if not sep or not field.strip() or not raw.strip():
        raise SpecError(f"{flag} '{text}' must be FIELD=VALUE, e.g. {example}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return field.strip(), value


def set_dotted(
    document: dict[str, Any], field: str, value: Any, *, flag: str, what: str, shorthands: Sequence[str] = ()
) -> None:
    """Set ``field`` (a dotted path such as ``parallel.tp``) of ``document`` to ``value``; a path that is not
    in the document is one error paragraph naming the flag, the field and the close names."""
    node: Any = document
    keys = field.split(".")
    for depth, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            known = sorted(node) if isinstance(node, dict) else []
            where = ".".join(keys[:depth]) or what
            names = known + (sorted(shorthands) if depth == 0 else [])
            hint = f"a shorthand ({', '.join(sorted(shorthands))}) or " if shorthands else ""
            raise SpecError(
                f"{flag} field '{field}': {where} has no '{key}'; {suggest(key, names)} Give {hint}a dotted path "
                f"of the {what} document."
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
            set_dotted(document, field, value, flag="--what-if", what="profile", shorthands=tuple(SHORTHANDS))
    said = ", ".join(f"{field}={value}" for field, value in assignments)
    document["provenance"]["source"] = f"{document['provenance']['source']}; what-if: {said}"
    return validate_spec(ClusterProfile, document, f"cluster '{profile.name}' with --what-if {said}")


PIPELINE_FIELDS = ("pp", "vpp")
"""Changing one of these drops a plan's ``layers_per_stage``: that split was for the old pipeline."""


def delay_follows_overlap(parallel: ParallelConfig, moved: set[str]) -> ParallelConfig:
    """The layout with ``delay_wgrad_compute`` set to its ``a2a_overlap`` where an assignment changed the
    overlap but not the delay (Megatron delays weight gradients only under the overlap; the search pairs
    them). ``moved``: the ``parallel`` fields assigned."""
    if "a2a_overlap" not in moved or "delay_wgrad_compute" in moved:
        return parallel
    return parallel.model_copy(update={"delay_wgrad_compute": parallel.a2a_overlap})


def override_plan(
    plan: Plan, assignments: Sequence[tuple[str, Any]], flag: str = "--set"
) -> tuple[Plan, list[str]]:
    """The plan with each ``(dotted field, value)`` set (``parallel.tp=2``, ``training.seq_len=8192``,
    ``parallel.dispatcher.kind=monta``), validated, and notes on what followed from it.

    The data-parallel degrees follow the others (``dp = world / (tp*cp*pp)``, ``edp = world /
    (etp*ep*pp)``), and changing ``pp`` or ``vpp`` drops an uneven ``layers_per_stage``. The plan's
    estimate no longer describes it, so it is dropped too.
    """
    if not assignments:
        return plan, []
    document = plan.model_dump(mode="json")
    for field, value in assignments:
        if field.split(".")[0] not in ("parallel", "training"):
            raise SpecError(
                f"{flag} field '{field}': only the plan's parallel.* and training.* settings can be changed; "
                f"its model, cluster and node shape say what it was made for."
            )
        set_dotted(document, field, value, flag=flag, what="plan")
    notes = []
    parallel = document["parallel"]
    moved = {f.split(".")[1] for f, _ in assignments if f.startswith("parallel.")}
    given = "layers_per_stage" in moved  # a split given with the new pipeline is for it
    if parallel.get("layers_per_stage") is not None and moved & set(PIPELINE_FIELDS) and not given:
        parallel["layers_per_stage"] = None
        notes.append("the plan's uneven layers_per_stage was dropped: it was for the old pipeline")
    said = ", ".join(f"{field}={value}" for field, value in assignments)
    fields = {k: v for k, v in parallel.items() if k not in ("dp", "edp")}
    try:
        resized = ParallelConfig.for_world(plan.num_gpus, **fields)
    except ValidationError as exc:
        raise SpecError(
            format_validation_error(exc, f"the plan with {flag} {said}", ParallelConfig)
        ) from None
    followed = delay_follows_overlap(resized, moved)
    if followed != resized:
        notes.append(f"delay_wgrad_compute follows a2a_overlap: {str(followed.a2a_overlap).lower()}")
    document["parallel"] = followed.model_dump(mode="json")
    document["estimate"] = None
    return validate_spec(Plan, document, f"the plan with {flag} {said}"), notes
