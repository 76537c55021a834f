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
validate`` reports). Leave-one-group-out cross-validation refits step 2 without each group and scores
that group: the error to expect on runs the fit has not seen.

Usage: python benchmarks/fit_framework_overheads.py [--dense FILE] [--moe FILE]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from planner.accuracy.validate import with_catalog_efficiency
from planner.accuracy.validation_file import ValidationSuite, case_inputs, load_validation_file, signed_error
from planner.costmodel import estimate
from planner.schema import FrameworkOverheads

DENSE = Path(__file__).parent / "data" / "dense-h100.yaml"
MOE = Path(__file__).resolve().parents[2] / "shared" / "validation" / "published.yaml"

Errors = dict[str, tuple[str, float]]
"""Case id -> (group, signed error)."""


def load(path: Path) -> ValidationSuite:
    return with_catalog_efficiency(load_validation_file(path))


def errors(suite: ValidationSuite, kernel_host_us: float, fraction: float) -> Errors:
    framework = FrameworkOverheads(
        kernel_host_us=kernel_host_us, sustained_compute_fraction=fraction, source="fit"
    )
    out: Errors = {}
    for case in suite.cases:
        if case.measured.value is None:
            continue
        inputs = case_inputs(suite, case)
        cluster = inputs.cluster.model_copy(update={"framework": framework})
        predicted = estimate(inputs.model, inputs.training, inputs.parallel, cluster)
        out[case.id] = (
            case.group,
            signed_error(getattr(predicted, case.measured.metric), case.measured.value),
        )
    return out


def mape(found: Errors, keep: Callable[[str], bool] = lambda group: True) -> float:
    values = [abs(error) for group, error in found.values() if keep(group)]
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dense", type=Path, default=DENSE)
    parser.add_argument("--moe", type=Path, default=MOE)
    args = parser.parse_args()
    dense, moe = load(args.dense), load(args.moe)

    fractions = [step / 100 for step in range(50, 101)]
    by_fraction = {f: errors(dense, 0.0, f) for f in fractions}
    fraction = min(fractions, key=lambda f: mape(by_fraction[f]))
    print(
        f"1. sustained_compute_fraction = {fraction:.2f}: dense MAPE {mape(by_fraction[fraction]):.1%} "
        f"over {len(by_fraction[fraction])} runs of {args.dense.name}"
    )

    hosts = [float(us) for us in range(0, 201, 5)]
    by_host = {us: errors(moe, us, fraction) for us in hosts}
    host = min(hosts, key=lambda us: mape(by_host[us]))
    print(
        f"2. kernel_host_us = {host:g}: MoE MAPE {mape(by_host[host]):.1%} over {len(by_host[host])} runs "
        f"of {args.moe.name} (0 us: {mape(by_host[0.0]):.1%}); dense MAPE with it "
        f"{mape(errors(dense, host, fraction)):.1%}"
    )

    held: list[float] = []
    for group in sorted({g for g, _ in by_host[host].values()}):

        def others(name: str, held_out: str = group) -> bool:
            return name != held_out

        refit = min(hosts, key=lambda us: mape(by_host[us], others))
        scores = [abs(e) for name, e in by_host[refit].values() if name == group]
        held += scores
        print(f"   held out {group:24s} refit {refit:5.0f} us  its MAPE {sum(scores) / len(scores):6.1%}")
    print(f"   leave-one-group-out MAPE {sum(held) / len(held):.1%}")
    for case_id, (_, error) in by_host[host].items():
        print(f"   {case_id:28s} {error:+.1%}")


if __name__ == "__main__":
    main()
