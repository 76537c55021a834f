"""Launchability sweep (issue 15): every plan ``solve`` returns must launch, over the whole catalog.

Cases: every catalog model x every bundled cluster (at its bundled size) x a small and a large global
batch x every precision (fp16, bf16, fp8, mxfp8), solved in-process with the default search options
(framework ``megatron``), sequence 4096. The batches depend on the world size W:

- small: the largest power of two at most W/2, i.e. half a sequence per GPU. A layout with pipeline
  degree pp, tensor x context degree t and micro-batch b then runs m = t*pp/(2b) micro-batches per
  pipeline, so ``m >= pp`` (rule 12) holds only when t >= 2b: the pipeline rules bite;
- large: 8 x W, eight sequences per GPU, where they rarely do.

A precision the cluster's GPU lacks (``planner.feasibility.precision_rules``: fp8 on A100, bf16 on
V100, mxfp8 before Blackwell) must be refused with exit 2 before any search; those cases count as
refusals, never as failures, and a plan returned for one is a violation.

Each case ends as one of:

- plan: a plan was returned. It is checked after the search, against the plan alone:
  ``planner.feasibility.check_plan`` with the GPU (every rule, Megatron-only ones included; layer
  split, rule 12's micro-batches, rule 13's precision, grouped GEMM and kernel-library needs), the
  framework's own rules (``planner.frameworks``, megatron), Megatron-LM's emitter rules
  (``planner.emit.emit_megatron`` raises on a plan it cannot express), a restatement here of the
  rules a launch fails on first (grids, batch split, micro-batches, layer split, GPU capability), and
  memory: the plan's estimate fits, its peak is within the GPU's memory, and the estimate priced
  again from the plan alone (``planner.costmodel.estimate``) fits too and agrees with it;
- refused: a clean moeplan error (``planner.errors.MoeplanError``), counted by exit code and reason;
- crashed: any other exception, a bug.

The script exits 1 when any plan breaks a rule or any case crashes (or a precision the GPU runs is
refused as bad input), else 0.

Usage: python benchmarks/launch_sweep.py [--quick] [--model NAME]... [--cluster NAME]... [--slowest N]

``--quick`` runs the subset ``QUICK_MODELS`` x ``QUICK_CLUSTERS`` (160 cases, 96 solves, about 2.5 min
on 2 cores). The full sweep is 624 cases (390 solved; the rest are precisions refused up front) and
took 24 min on a shared 2-core machine, half of it on h800-dsv3's 2048 GPUs; its slowest solve,
llama3-8x70b there at the large batch, takes 40-50 s.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from planner.catalog import catalog_names, cluster_names, load_cluster, load_model
from planner.costmodel import estimate
from planner.emit import emit_megatron
from planner.errors import InfeasiblePlanError, MoeplanError, SolverError, SpecError
from planner.feasibility import PRECISION_CAPABILITY, check_plan, precision_rules
from planner.frameworks import framework
from planner.schema import ClusterProfile, ModelSpec, Plan, TrainingSpec
from planner.search import SearchOptions, solve
from planner.units import GIB

PRECISIONS = tuple(PRECISION_CAPABILITY)
"""Every training precision moeplan knows (fp16, bf16, fp8, mxfp8)."""
SEQ_LEN = 4096
FRAMEWORK = "megatron"
"""The default launch target; ``SearchOptions()`` searches for it."""
RELATIVE_TOLERANCE = 1e-6
"""How closely the plan's estimate and the estimate priced again from the plan alone must agree."""

QUICK_MODELS = ("tiny-moe", "mixtral-8x7b", "qwen2-57b-a14b", "deepseek-v2-lite")
QUICK_CLUSTERS = ("a800-2x8", "dgx-a100", "dgx-h100", "gb200-nvl72", "v100-pcie")


@dataclass(frozen=True, slots=True)
class Case:
    """One solve: a catalog model on a bundled cluster at one global batch and precision."""

    model: str
    cluster: str
    batch: str
    """``small`` or ``large`` (see ``global_batches``)."""
    global_batch: int
    precision: str

    @property
    def label(self) -> str:
        return f"{self.model}/{self.cluster}/{self.batch}-{self.global_batch}/{self.precision}"

    def training(self) -> TrainingSpec:
        return TrainingSpec(seq_len=SEQ_LEN, global_batch=self.global_batch, precision=self.precision)

    def command(self) -> str:
        """The ``moeplan solve`` command that reproduces this case."""
        return (
            f"moeplan solve --model {self.model} --cluster {self.cluster} --gbs {self.global_batch} "
            f"--seq-len {SEQ_LEN} --precision {self.precision}"
        )


@dataclass(slots=True)
class Outcome:
    """How one case ended. ``violations``: the launch rules its plan breaks, or, for a refusal, that
    valid input was refused as bad input."""

    case: Case
    kind: str
    """``plan``, ``refused`` or ``crashed``."""
    seconds: float
    reason: str = ""
    """For a refusal: exit code and reason; for a crash: the exception; for a plan: its layout."""
    violations: list[str] = field(default_factory=list)
    optimal: bool = True
    pp: int = 1
    """The plan's pipeline degree."""

    @property
    def failed(self) -> bool:
        return self.kind == "crashed" or bool(self.violations)


def global_batches(world: int) -> dict[str, int]:
    """The small and large global batch of a world of ``world`` GPUs (module docstring)."""
    return {"small": 2 ** int(math.log2(max(world // 2, 1))), "large": 8 * world}


def cases(models: Iterable[str] | None = None, clusters: Iterable[str] | None = None) -> Iterator[Case]:
    """Every case of the sweep (or of the models and clusters named), in a deterministic order."""
    models = list(models or catalog_names())
    for cluster in clusters or cluster_names():
        world = load_cluster(cluster).world_size
        for model in models:
            for batch, gbs in global_batches(world).items():
                for precision in PRECISIONS:
                    yield Case(model, cluster, batch, gbs, precision)


def _restated_rules(model: ModelSpec, cluster: ClusterProfile, plan: Plan) -> list[str]:
    """The rules a launch fails on first, written out again here so that a bug in ``planner.feasibility``
    itself cannot hide a broken plan."""
    p, training, world, out = plan.parallel, plan.training, cluster.world_size, []
    if p.tp * p.cp * p.pp * p.dp != world or p.etp * p.ep * p.pp * p.edp != world:
        out.append(f"grids: tp*cp*pp*dp and etp*ep*pp*edp must both be {world}")
    if training.global_batch % (p.micro_batch * p.dp):
        out.append(f"global_batch {training.global_batch} is not a multiple of micro_batch x dp")
    m = training.global_batch // (p.micro_batch * p.dp)
    if p.pp > 1 and m < p.pp:
        out.append(f"{m} micro-batches per step cannot fill pp {p.pp}")
    if p.pp > 1 and p.vpp > 1 and m % p.pp:
        out.append(f"{m} micro-batches per step are not a multiple of pp {p.pp} (vpp {p.vpp})")
    split = p.layers_per_stage
    if split is not None and (len(split) != p.pp * p.vpp or sum(split) != model.num_layers or min(split) < 1):
        out.append(f"layers_per_stage {list(split)} is not a split of {model.num_layers} layers into pp*vpp")
    if split is None and model.num_layers % (p.pp * p.vpp):
        out.append(f"pp*vpp {p.pp * p.vpp} does not divide {model.num_layers} layers")
    gpu, have = cluster.gpu, cluster.gpu.capability
    need = PRECISION_CAPABILITY[training.precision]
    if have is not None and have < need:
        out.append(
            f"precision {training.precision} needs compute capability {need[0]}.{need[1]}; "
            f"{gpu.name} has {gpu.compute_capability}"
        )
    if have is not None and have < (8, 0) and p.grouped_gemm and model.is_moe:
        out.append(f"grouped GEMM needs compute capability 8.0; {gpu.name} has {gpu.compute_capability}")
    return out


UNEXPRESSIBLE = ("yarn", "clip_qkv")
"""Model semantics Megatron-LM cannot train (its emitter refuses them, naming why): gpt-oss's YaRN, DBRX's
QKV clamp. They are the model's, not the plan's: the layout is checked without them."""


def launchable_semantics(model: ModelSpec) -> ModelSpec:
    """``model`` without what Megatron-LM cannot express (``UNEXPRESSIBLE``)."""
    return model.model_copy(update=dict.fromkeys(UNEXPRESSIBLE))


def launch_violations(
    model: ModelSpec, cluster: ClusterProfile, plan: Plan, asked: TrainingSpec
) -> list[str]:
    """Every launch rule ``plan`` breaks on ``cluster`` (empty: it launches); see the module docstring."""
    p, training, out = plan.parallel, plan.training, []
    if (plan.num_gpus, plan.num_nodes, plan.num_gpus_per_node) != (
        cluster.world_size,
        cluster.num_nodes,
        cluster.num_gpus_per_node,
    ):
        out.append(f"node shape {plan.num_nodes} x {plan.num_gpus_per_node} is not the cluster's")
    if (training.global_batch, training.seq_len, training.precision) != (
        asked.global_batch,
        asked.seq_len,
        asked.precision,
    ):
        out.append(f"training {training} is not the one asked for ({asked})")
    out += [f"feasibility: {v}" for v in check_plan(model, training, p, plan.num_gpus, cluster.gpu)]
    out += [f"framework {FRAMEWORK}: {v}" for v in framework(FRAMEWORK).rules(model, training, p)]
    try:
        emit_megatron(plan, launchable_semantics(model))
    except SpecError as exc:
        out.append(f"Megatron emitter: {exc}")
    out += [f"restated: {rule}" for rule in _restated_rules(model, cluster, plan)]
    capacity = cluster.gpu.hbm_gib * GIB
    found = plan.estimate
    if found is None:
        out.append("memory: the plan carries no estimate")
    else:
        if not found.fits or found.peak_memory_bytes > capacity:
            out.append(f"memory: the estimate's peak {found.peak_memory_bytes / GIB:.1f} GiB does not fit")
        again = estimate(model, training, p, cluster)
        if not again.fits or again.peak_memory_bytes > capacity:
            out.append(f"memory: priced again, the peak {again.peak_memory_bytes / GIB:.1f} GiB does not fit")
        for name in ("step_time_s", "peak_memory_bytes"):
            a, b = getattr(found, name), getattr(again, name)
            if not math.isclose(a, b, rel_tol=RELATIVE_TOLERANCE):
                out.append(f"estimate: {name} is {a:.6g} in the plan but {b:.6g} priced again")
    return out


def _refusal(exc: MoeplanError) -> str:
    """Exit code and reason of a clean refusal."""
    text = str(exc)
    if isinstance(exc, SpecError) and text.startswith("precision ("):
        why = "precision the GPU lacks"
    elif isinstance(exc, InfeasiblePlanError) and "does not fit on" in text:
        why = "does not fit in memory"
    elif isinstance(exc, InfeasiblePlanError) and text.startswith("no parallel layout"):
        why = "no layout meets the rules"
    elif isinstance(exc, SolverError):
        why = "solver failure"
    else:
        why = type(exc).__name__
    return f"exit {exc.exit_code}: {why}"


def run_case(case: Case, time_limit_s: float = 60.0) -> Outcome:
    """Solve one case and check what came back."""
    model, cluster, asked = load_model(case.model), load_cluster(case.cluster), case.training()
    lacks = bool(precision_rules(asked, cluster.gpu))
    start = time.perf_counter()
    try:
        result = solve(model, asked, cluster, SearchOptions(framework=FRAMEWORK), time_limit_s=time_limit_s)
    except MoeplanError as exc:
        outcome = Outcome(case, "refused", time.perf_counter() - start, _refusal(exc))
        if not lacks and isinstance(exc, SpecError):
            # Valid input answered as bad input: not a clean refusal.
            outcome.violations.append(f"refused as bad input a precision the GPU runs: {exc}")
        return outcome
    except Exception as exc:  # any other exception is a bug: report it, go on with the sweep
        last = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno}"
        return Outcome(
            case, "crashed", time.perf_counter() - start, f"{type(exc).__name__} at {where}: {exc}"
        )
    seconds = time.perf_counter() - start
    plan, p = result.plan, result.plan.parallel
    layout = f"tp{p.tp} pp{p.pp} vpp{p.vpp} cp{p.cp} ep{p.ep} etp{p.etp} dp{p.dp} mbs{p.micro_batch}"
    proven = plan.solver is None or plan.solver.optimal
    outcome = Outcome(case, "plan", seconds, layout, optimal=proven, pp=p.pp)
    if lacks:
        outcome.violations.append(f"a plan for precision {case.precision}, which {cluster.gpu.name} lacks")
    outcome.violations += launch_violations(model, cluster, plan, asked)
    return outcome


def report(outcomes: list[Outcome], wall_s: float, slowest: int = 10) -> str:
    """The counts table, the slowest solves and every failure, as text."""
    kinds = Counter(o.kind for o in outcomes)
    refusals = Counter(o.reason for o in outcomes if o.kind == "refused")
    plans = [o for o in outcomes if o.kind == "plan"]
    broken = [o for o in outcomes if o.violations]
    solved = [o for o in outcomes if not (o.kind == "refused" and o.reason.startswith("exit 2: precision"))]
    rows = [
        ("cases", len(outcomes)),
        ("  solved (precision the GPU runs)", len(solved)),
        ("plans", kinds["plan"]),
        ("  proven optimal", sum(o.optimal for o in plans)),
        ("  pipelined (pp > 1)", sum(o.pp > 1 for o in plans)),
        ("refusals", kinds["refused"]),
        *((f"  {reason}", n) for reason, n in sorted(refusals.items())),
        ("crashes", kinds["crashed"]),
        ("plans breaking a launch rule", sum(o.kind == "plan" for o in broken)),
        ("valid precisions refused as bad input", sum(o.kind == "refused" for o in broken)),
        ("rule violations (all)", sum(len(o.violations) for o in broken)),
    ]
    lines = [f"{'':40s} {'count':>6s}", *(f"{name:40s} {n:6d}" for name, n in rows)]
    lines.append(f"wall time {wall_s:.1f} s ({sum(o.seconds for o in outcomes):.1f} s in solve)")
    lines.append(f"\nslowest {slowest} solves:")
    for o in sorted(outcomes, key=lambda o: -o.seconds)[:slowest]:
        lines.append(f"  {o.seconds:7.2f} s  {o.case.label:58s} {o.kind}: {o.reason[:60]}")
    for o in outcomes:
        if o.failed:
            lines.append(f"\nFAILED {o.case.label} ({o.kind}): {o.case.command()}")
            lines += [f"  - {v}" for v in o.violations or [o.reason]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="the QUICK subset of models and clusters")
    parser.add_argument("--model", action="append", help="only this catalog model (repeatable)")
    parser.add_argument("--cluster", action="append", help="only this bundled cluster (repeatable)")
    parser.add_argument("--slowest", type=int, default=10, help="how many of the slowest solves to list")
    args = parser.parse_args(argv)
    models = args.model or (QUICK_MODELS if args.quick else None)
    clusters = args.cluster or (QUICK_CLUSTERS if args.quick else None)
    start = time.perf_counter()
    outcomes = []
    for case in cases(models, clusters):
        outcome = run_case(case)
        outcomes.append(outcome)
        mark = "FAIL" if outcome.failed else "ok"
        print(f"{mark:4s} {outcome.seconds:6.2f} s {case.label:58s} {outcome.kind}: {outcome.reason[:70]}",
              file=sys.stderr, flush=True)  # fmt: skip
    print(report(outcomes, time.perf_counter() - start, args.slowest))
    return 1 if any(o.failed for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
