"""Fit the framework overheads of Megatron-Core (``compute.MEGATRON_CORE_EAGER``) to published runs.

Microbenchmarks price kernels alone. Two figures describe what the training software adds
(``FrameworkOverheads``), and this script fits each to the published runs that isolate it:

1. ``sustained_compute_fraction``: the share of the microbenchmarked GEMM and attention throughput
   that training sustains. Dense models are GEMM-bound and launch few, long kernels, so their step
   time pins this figure alone: fitted to the dense DGX-H100 runs of ``benchmarks/data/dense-h100.yaml``
   (Megatron-Bridge and DGX Cloud benchmark tables; every case cites its source).
2. ``kernel_host_us``: host time per kernel a layer launches from Python. Fine-grained MoE layers
   launch hundreds of kernels per micro-batch, and small ones (Qwen3-30B, Moonlight, TP4 layouts) are
   host-bound; with the fraction fixed by step 1, fitted to a file of published MoE runs (default
   ``../shared/validation/published.yaml``).

Both fits are grid searches minimising the mean absolute error of the file's metric (what ``moeplan
validate`` reports). Each fit is scored on runs it did not see: the fraction refitted without each dense
run and scored on it (leave one run out), the host time refitted without each group of MoE runs and
scored on that group (leave one group out).

Then the fitted figures are scored on the locked files (``LOCKED``): published runs that no fit reads,
from sources the fitted files do not cite. ``fit`` takes only the two fitted files; the locked files are
read after it has chosen its figures, by ``score_locked``, so their error is held out by construction.

The figures go to ``planner/costmodel/data/framework_fit.json``, which the cost model reads its
constants from and the READMEs' generated blocks quote (``planner.costmodel.framework_fit``):

    python benchmarks/fit_framework_overheads.py           # print, and exit 1 if the file is stale
    python benchmarks/fit_framework_overheads.py --write   # rewrite the file and the READMEs' blocks
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from planner.accuracy.validate import with_catalog_efficiency
from planner.accuracy.validation_file import (
    ValidationSuite,
    case_inputs,
    load_validation_file,
    pairwise_agreement,
    signed_error,
    top1_match,
)
from planner.costmodel import estimate
from planner.costmodel.framework_fit import DOCS_BEGIN, DOCS_END, FIT_FILE, summary_markdown
from planner.schema import FrameworkOverheads

REPO = Path(__file__).resolve().parents[1]
DENSE = REPO / "benchmarks" / "data" / "dense-h100.yaml"
MOE = REPO.parent / "shared" / "validation" / "published.yaml"
LOCKED = (
    REPO / "benchmarks" / "data" / "korthikanti-table5.yaml",
    REPO / "benchmarks" / "data" / "locked-moe.yaml",
)
"""Held-out files: scored with the fitted figures, never fitted to (tests/validation/test_locked.py)."""
DOCS = (REPO / "README.md", REPO / "planner" / "costmodel" / "README.md")
FRACTIONS = [step / 100 for step in range(50, 101)]
HOSTS = [float(us) for us in range(0, 201, 5)]

Errors = dict[str, tuple[str, float]]
"""Case id -> (group, signed error)."""


def load(path: Path) -> ValidationSuite:
    return with_catalog_efficiency(load_validation_file(path))


def predictions(suite: ValidationSuite, kernel_host_us: float, fraction: float) -> dict[str, float]:
    """Case id -> the predicted value of its metric, with the given framework figures."""
    framework = FrameworkOverheads(
        kernel_host_us=kernel_host_us, sustained_compute_fraction=fraction, source="fit"
    )
    out: dict[str, float] = {}
    for case in suite.cases:
        inputs = case_inputs(suite, case)
        cluster = inputs.cluster.model_copy(update={"framework": framework})
        predicted = estimate(inputs.model, inputs.training, inputs.parallel, cluster)
        out[case.id] = float(getattr(predicted, case.measured.metric))
    return out


def errors(suite: ValidationSuite, kernel_host_us: float, fraction: float) -> Errors:
    predicted = predictions(suite, kernel_host_us, fraction)
    return {
        case.id: (case.group, signed_error(predicted[case.id], case.measured.value))
        for case in suite.cases
        if case.measured.value is not None
    }


def score_locked(paths: tuple[Path, ...], kernel_host_us: float, fraction: float) -> list[dict[str, Any]]:
    """The fitted figures scored on each locked file: its MAPE and, over its groups of two or more runs of
    one metric, how often the best measured run is predicted best and how many pairs are ordered right
    (what ``moeplan validate`` reports for the file)."""
    scored = []
    for path in paths:
        suite = load(path)
        predicted = predictions(suite, kernel_host_us, fraction)
        found = errors(suite, kernel_host_us, fraction)
        by_group: dict[str, list[Any]] = {}
        for case in suite.cases:
            by_group.setdefault(case.group, []).append(case)
        ranked, first, right, pairs = 0, 0, 0.0, 0
        for members in by_group.values():
            if len(members) < 2 or len({m.measured.metric for m in members}) != 1:
                continue
            ranked += 1
            metric = members[0].measured.metric
            first += top1_match(
                [predicted[m.id] for m in members], [m.measured.value for m in members], metric
            )
            timed = [m for m in members if m.measured.value is not None]
            got, count = pairwise_agreement(
                [predicted[m.id] for m in timed], [m.measured.value for m in timed]
            )
            right, pairs = right + got, pairs + count
        scored.append(
            {
                "file": _shown(path), "sha256": digest(path), "runs": len(found), "mape": round(mape(found), 4),
                "groups_ranked": ranked, "best_first": first, "pairs": pairs, "pairs_right": right,
            }
        )  # fmt: skip
    return scored


def mape(found: Errors, keep: Callable[[str], bool] = lambda key: True, by: int = 0) -> float:
    """Mean absolute error over the cases kept (``by`` 0: keep by group, 1: by case id)."""
    values = [abs(error) for case_id, (group, error) in found.items() if keep((group, case_id)[by])]
    return sum(values) / len(values)


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else f"../{path.relative_to(REPO.parent)}"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fit(dense_path: Path, moe_path: Path) -> dict[str, Any]:
    """Both fits, each scored in-sample and held out, as the file records them."""
    dense, moe = load(dense_path), load(moe_path)
    by_fraction = {f: errors(dense, 0.0, f) for f in FRACTIONS}
    fraction = min(FRACTIONS, key=lambda f: mape(by_fraction[f]))
    held_dense = []
    for case_id in by_fraction[fraction]:
        refit = min(FRACTIONS, key=lambda f: mape(by_fraction[f], lambda c, held=case_id: c != held, by=1))
        held_dense.append(abs(by_fraction[refit][case_id][1]))
    by_host = {us: errors(moe, us, fraction) for us in HOSTS}
    host = min(HOSTS, key=lambda us: mape(by_host[us]))
    held: list[float] = []
    groups: dict[str, dict[str, float]] = {}
    for group in sorted({g for g, _ in by_host[host].values()}):
        refit = min(HOSTS, key=lambda us: mape(by_host[us], lambda g, held_out=group: g != held_out))
        scores = [abs(e) for name, e in by_host[refit].values() if name == group]
        held += scores
        groups[group] = {"refit_kernel_host_us": refit, "mape": round(sum(scores) / len(scores), 4)}

    return {
        "script": "benchmarks/fit_framework_overheads.py",
        "sustained_compute_fraction": fraction,
        "kernel_host_us": host,
        "dense": {
            "file": _shown(dense_path), "sha256": digest(dense_path), "runs": len(by_fraction[fraction]),
            "mape_fitted": round(mape(by_fraction[fraction]), 4),
            "mape_with_host_time": round(mape(errors(dense, host, fraction)), 4),
            "mape_leave_one_out": round(sum(held_dense) / len(held_dense), 4),
        },
        "moe": {
            "file": _shown(moe_path), "sha256": digest(moe_path), "runs": len(by_host[host]), "groups": len(groups),
            "mape_without_host": round(mape(by_host[0.0]), 4), "mape_fitted": round(mape(by_host[host]), 4),
            "mape_leave_one_group_out": round(sum(held) / len(held), 4), "held_out_groups": groups,
            "errors": {case_id: round(error, 4) for case_id, (_, error) in by_host[host].items()},
        },
    }  # fmt: skip


def write_docs(block: str) -> None:
    """Replace the generated block in each README (between the markers)."""
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        start, end = text.index(DOCS_BEGIN), text.index(DOCS_END) + len(DOCS_END)
        path.write_text(text[:start] + block + text[end:], encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dense", type=Path, default=DENSE)
    parser.add_argument("--moe", type=Path, default=MOE)
    parser.add_argument("--write", action="store_true", help="rewrite the fit file and the READMEs' blocks")
    args = parser.parse_args()
    locked = tuple(path.resolve() for path in LOCKED)
    if {args.dense.resolve(), args.moe.resolve()} & set(locked):
        parser.error("a locked file is held out: it cannot be fitted to")
    found = fit(args.dense.resolve(), args.moe.resolve())
    found["locked"] = score_locked(locked, found["kernel_host_us"], found["sustained_compute_fraction"])
    dense, moe = found["dense"], found["moe"]
    print(
        f"1. sustained_compute_fraction = {found['sustained_compute_fraction']:.2f}: dense MAPE "
        f"{dense['mape_fitted']:.1%} over {dense['runs']} runs of {dense['file']} (leave one run out "
        f"{dense['mape_leave_one_out']:.1%})"
    )
    print(
        f"2. kernel_host_us = {found['kernel_host_us']:g}: MoE MAPE {moe['mape_fitted']:.1%} over {moe['runs']} "
        f"runs of {moe['file']} (0 us: {moe['mape_without_host']:.1%}); dense MAPE with it "
        f"{dense['mape_with_host_time']:.1%}"
    )
    for group, held in moe["held_out_groups"].items():
        print(
            f"   held out {group:24s} refit {held['refit_kernel_host_us']:5.0f} us  its MAPE {held['mape']:6.1%}"
        )
    print(f"   leave-one-group-out MAPE {moe['mape_leave_one_group_out']:.1%}")
    for case_id, error in moe["errors"].items():
        print(f"   {case_id:28s} {error:+.1%}")
    for held in found["locked"]:
        print(
            f"locked (no fit reads it) {held['file']}: MAPE {held['mape']:.1%} over {held['runs']} runs; best "
            f"measured predicted best in {held['best_first']} of {held['groups_ranked']} groups"
        )
    text = json.dumps(found, indent=2, sort_keys=True) + "\n"
    if args.write:
        FIT_FILE.write_text(text, encoding="utf-8")
        write_docs(summary_markdown(found))
        print(f"wrote {FIT_FILE.relative_to(REPO)} and the blocks of {', '.join(_shown(p) for p in DOCS)}")
        return 0
    if not FIT_FILE.is_file() or FIT_FILE.read_text(encoding="utf-8") != text:
        print(f"{FIT_FILE.relative_to(REPO)} is stale: run with --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
