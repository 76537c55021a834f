"""The solver: the provably best plan under the cost model.

Layouts (degrees, micro-batch, recompute, dispatcher) come from ``space.py``; for each, the stage
assignment is solved exactly by the ILP of ``ilp.py``. A layout whose memory floor does not fit with the
model-state settings asked for (Megatron-LM's defaults unless the user set others) is also tried with
each setting of ``space.optimizer_ladder`` whose floors fit: the precision-aware optimizer, then optimizer
CPU offload of a growing share, settings that keep the model's numerics (``_MemoryRelief``). Layouts are visited in order of an admissible
lower bound (``bounds.lower_bound``) and the search stops once the next bound is no better than the best
plan found: the result is optimal over the whole space, not only over the layouts solved (branch and
bound). Before its ILP, a layout gets the sharper ``bounds.memory_bound`` (memory forces layers off
some ranks): one that fits nowhere is skipped, and one whose bound is above the incumbent can neither
win nor tie, so it is solved only if its plan could be among the alternatives reported beside the
winner. ``exhaustive=True`` replaces the ILP by enumeration of every stage assignment, the oracle the
tests compare it with.

Ties are broken by moeplan, not by the solver (whose choice among equal optima changes between
versions). Plans within ``TIE_TOLERANCE`` (relative) of the fastest are ties, so layouts tied with the
incumbent are solved rather than pruned. Each tied layout's split is made canonical: the
lexicographically largest ``layers_per_stage`` among its splits within the tolerance of its optimum
(``ilp.canonical_stages``; earliest chunks fullest, as the even split puts its remainder first),
re-proven by ``evaluate``. Among tied layouts one without a model-altering technique wins (offered,
never stamped: a technique is in the plan only when strictly faster), then the least peak memory, then
the first in enumeration order.
"""

from __future__ import annotations

import importlib
import itertools
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from planner import __version__
from planner.costmodel.dispatchers import dispatcher, spec_for
from planner.costmodel.estimate import LayerCache, LayoutCosts, evaluate, layer_seconds, layout_costs
from planner.costmodel.memory import (
    MemoryCoefficients,
    MemoryModel,
    optimizer_bytes_per_param,
    split_chunks,
    with_optimizer,
)
from planner.costmodel.optimizer import OptimizerRates, host_capacity_per_gpu, optimizer_rates
from planner.costmodel.routing import layout_imbalance
from planner.errors import InfeasiblePlanError, SolverError, SpecError
from planner.feasibility import num_microbatches, precision_rules, with_gpu_precision
from planner.frameworks import MODEL_ALTERING, framework, techniques
from planner.schema import (
    ClusterProfile,
    ClusterRef,
    Estimate,
    ModelRef,
    ModelSpec,
    OptimizerConfig,
    ParallelConfig,
    Plan,
    PlanProvenance,
    SolverInfo,
    TrainingSpec,
    memory_margin_bytes,
)
from planner.search.bounds import (
    TIE_TOLERANCE,
    average_bound,
    host_floor,
    in_bound_order,
    lower_bound,
    memory_bound,
    memory_floor,
    optimizer_floor,
    optimizer_floor_bytes,
)
from planner.search.progress import ProgressReporter, SolveProgress
from planner.search.space import (
    OFFLOAD_FRACTIONS,
    SearchOptions,
    candidate_layouts,
    optimizer_ladder,
    runnable_backends,
)
from planner.units import GIB, human_bytes

__all__ = ["Alternative", "SearchOptions", "SearchResult", "SolveProgress", "alters_model", "solve"]

LAYOUT_TIME_LIMIT_S = 10.0
"""Time one layout's ILP may take; past it the best assignment found is kept and the plan is not proven."""
SEED_LAYOUTS = 2048
"""Layouts (best bounds first) whose even split seeds the incumbent before any ILP."""
SEED_MARGIN = 1e-9
"""Relative margin over the incumbent past which a seed's bound ends the seeding: far above the rounding
of the bound and of ``evaluate`` (an even split improves the incumbent only if faster by 1e-12 s)."""
EXHAUSTIVE_LIMIT = 200_000
"""Stage assignments ``--exhaustive`` will enumerate before refusing."""


@dataclass(frozen=True, slots=True)
class Alternative:
    """A solved layout: its plan layout and estimate."""

    parallel: ParallelConfig
    estimate: Estimate

    @property
    def structure(self) -> tuple[int, ...]:
        return _structure(self.parallel)


def _structure(p: ParallelConfig) -> tuple[int, ...]:
    """The degrees of a layout: ``alternatives`` keeps the best plan of each."""
    return (p.tp, p.pp, p.vpp, p.cp, p.ep, p.etp)


@dataclass(frozen=True, slots=True)
class SearchResult:
    plan: Plan
    alternatives: tuple[Alternative, ...]
    """The best plan of each of up to ``top_k`` other structures (degrees), best first: after the winner
    the search goes on in bound order until no unreached layout can displace them (within the time limit)."""
    layouts: int
    solved: int


def _load_ilp() -> None:
    """Import ``planner.search.ilp`` (and PuLP), if not yet, from a thread of its own.

    PuLP keeps the exceptions it catches while probing solver libraries at import (COPT, CPLEX), and
    their tracebacks keep alive every frame below the import, with its locals: imported from within
    ``solve``, the whole search's layouts and costs, until the interpreter exits (about 0.4 s of freeing
    at the exit of the DeepSeek-V3 solve). Below a thread's import there is no such frame.
    """
    if "planner.search.ilp" not in sys.modules:
        thread = threading.Thread(target=importlib.import_module, args=("planner.search.ilp",))
        thread.start()
        thread.join()


def _compositions(total: int, parts: int) -> itertools.chain[tuple[int, ...]]:
    """Every way to split ``total`` layers into ``parts`` contiguous chunks of at least one layer."""
    cuts = itertools.combinations(range(1, total), parts - 1)
    return itertools.chain(tuple(b - a for a, b in zip((0, *c), (*c, total), strict=True)) for c in cuts)


def _exhaustive(costs: LayoutCosts) -> tuple[float, tuple[int, ...]] | None:
    """The best stage assignment of one layout by enumeration (same objective and memory rule)."""
    model, p = costs.context.model, costs.context.parallel
    chunks = p.pp * p.vpp
    if chunks > model.num_layers:
        return None
    if math.comb(model.num_layers - 1, chunks - 1) > EXHAUSTIVE_LIMIT:
        raise SolverError(
            f"--exhaustive would enumerate {math.comb(model.num_layers - 1, chunks - 1):,} stage assignments of "
            f"{model.num_layers} layers over {chunks} chunks (limit {EXHAUSTIVE_LIMIT:,}); use the ILP instead."
        )
    fitting: list[tuple[float, tuple[int, ...]]] = []
    for sizes in _compositions(model.num_layers, chunks):
        result = evaluate(costs, split_chunks(model, p.model_copy(update={"layers_per_stage": sizes})))
        if result.fits:
            fitting.append((result.step_time_s, sizes))
    if not fitting:
        return None
    # The tie rule of the ILP's canonical_stages, by enumeration: the largest sizes among the fastest.
    fastest = min(step for step, _ in fitting)
    return max(((step, sizes) for step, sizes in fitting if step <= fastest * (1 + TIE_TOLERANCE)),
               key=lambda item: item[1])  # fmt: skip


def _canonical_winner(
    solved: list[Alternative], indices: list[int], priced: dict[int, LayoutCosts], exhaustive: bool
) -> Alternative:
    """The reported plan among the fastest, by moeplan's tie rule (module docstring), not the solver's."""
    fastest = min(alt.estimate.step_time_s for alt in solved)
    tied: dict[int, Alternative] = {}
    for alt, index in zip(solved, indices, strict=True):
        if alt.estimate.step_time_s <= fastest * (1 + TIE_TOLERANCE) and index not in tied:
            tied[index] = alt if exhaustive else _canonical_split(priced[index], alt)
    # Equal times: the plan without a model-altering technique (offered, never stamped), then the least memory.
    _, _, _, winner = min(
        (alters_model(alt.parallel), alt.estimate.peak_memory_bytes, index, alt)
        for index, alt in tied.items()
    )
    return winner


def _canonical_split(costs: LayoutCosts, alt: Alternative) -> Alternative:
    """``alt``'s layout with the canonical stage split among its ties, re-proven by ``evaluate``
    (``alt`` itself when the follow-up ILPs cannot re-prove one)."""
    _load_ilp()  # PuLP is imported only when a layout is solved
    from planner.search.ilp import canonical_stages

    model, optimum = costs.context.model, alt.estimate.step_time_s
    sizes = tuple(d + m for d, m in split_chunks(model, alt.parallel))
    canonical = canonical_stages(costs, optimum, sizes, LAYOUT_TIME_LIMIT_S)
    if canonical is not None:
        parallel = alt.parallel.model_copy(update={"layers_per_stage": canonical})
        result = evaluate(costs, split_chunks(model, parallel))
        # The solver's row tolerances (1e-7 absolute) allow a canonical split this much slower.
        if result.fits and result.step_time_s <= optimum * (1 + TIE_TOLERANCE) + 1e-7:
            return Alternative(parallel, result)
    # Only when a follow-up ILP stopped unproven (its time limit, or a solver failure): the solver's
    # split is then reported as found.
    return alt


def _held_to(cluster: ClusterProfile, margin_bytes: float) -> ClusterProfile:
    """``cluster`` with every GPU's memory less ``margin_bytes``."""
    if margin_bytes == 0:
        return cluster
    gpu = cluster.gpu.model_copy(update={"hbm_gib": cluster.gpu.hbm_gib - margin_bytes / GIB})
    return cluster.model_copy(update={"gpu": gpu})


def _constraints(options: SearchOptions) -> str:
    """The user's constraints as solve's flags (for messages), or ''."""
    flags = {"micro_batch": "mbs"}
    held = [f"--{flags.get(name, name)} {value}" for name, value in options.fixed]
    held += [f"--max-{flags.get(name, name)} {value}" for name, value in options.maxima]
    return " ".join(held)


def _refuse_impossible_constraints(
    model: ModelSpec, training: TrainingSpec, cluster: ClusterProfile, options: SearchOptions
) -> None:
    """A fixed degree no layout of this cluster can have is an input error (exit 2), said before searching."""
    world, experts = cluster.world_size, model.num_experts or 1
    for name, value in options.fixed:
        flag = "--mbs" if name == "micro_batch" else f"--{name}"
        if name in ("tp", "pp", "cp", "ep", "etp") and world % value:
            raise SpecError(
                f"{flag} {value}: a parallel degree must divide the {world} GPUs of '{cluster.name}'."
            )
        if name == "ep" and experts % value:
            raise SpecError(
                f"{flag} {value}: the expert parallel degree must divide the {experts} experts of '{model.name}'."
            )
        if name == "micro_batch" and training.global_batch % value:
            raise SpecError(
                f"{flag} {value}: the micro-batch must divide the global batch ({training.global_batch})."
            )
        if name in ("pp", "vpp") and value > model.num_layers:
            raise SpecError(
                f"{flag} {value}: more pipeline chunks than the {model.num_layers} layers of '{model.name}'."
            )
    hbm = cluster.gpu.hbm_gib * GIB
    if memory_margin_bytes(options.memory_margin, hbm) >= hbm:
        raise SpecError(
            f"--memory-margin {options.memory_margin} keeps all of the {human_bytes(hbm)} of a "
            f"{cluster.gpu.name} free; use a percentage (5%) or fewer GiB."
        )


def _infeasible(
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterProfile,
    least: list[tuple[float, ParallelConfig]],
    options: SearchOptions,
) -> InfeasiblePlanError:
    """Why no plan: no layout at all, or the least memory any layout needs (with the optimizer settings
    that need the least, ``_MemoryRelief.least``)."""
    layouts = [layout for _, layout in least]
    if not layouts and options.dispatchers_named:
        rules = "; ".join(
            # Its rules as broken by the layout with every degree 1 (they all ask for degrees above 1).
            f"{name} {rule}"
            for name in options.dispatchers
            for rule in dispatcher(spec_for(name).kind).rules(model, ParallelConfig())
        )
        return InfeasiblePlanError(
            f"no layout of {cluster.world_size} GPUs for '{model.name}' can use --dispatcher "
            f"{' or '.join(options.dispatchers)} under --framework {options.framework}"
            + (f" ({rules})" if rules else "")
            + ": name another dispatcher too, or change the GPU count or the global batch."
        )
    constraints = _constraints(options)
    if not layouts:
        held = f"has {constraints} and " if constraints else ""
        change = "relax the constraints" if constraints else "change the global batch or the GPU count"
        return InfeasiblePlanError(
            f"no parallel layout of {cluster.world_size} GPUs for '{model.name}' (global batch "
            f"{training.global_batch}, sequence {training.seq_len}) {held}satisfies Megatron's rules: the global "
            "batch must be a multiple of micro_batch x dp, and a pipeline (pp above 1) needs at least pp "
            "micro-batches per step, a multiple of pp when interleaved (`moeplan estimate` with a layout's "
            f"degrees names the rule it breaks); {change}."
        )
    peak, parallel = min(least, key=lambda item: item[0])
    hbm = cluster.gpu.hbm_gib * GIB
    margin = memory_margin_bytes(options.memory_margin, hbm)
    capacity = hbm - margin
    needed = math.ceil(cluster.world_size * peak / capacity)
    relax = "more GPUs (--nodes), GPUs with more memory"
    offload = _offload_refusal(training, cluster, options)
    if offload:
        relax += f", optimizer CPU offload ({offload})"
    elif cluster.host is not None and parallel.optimizer.offload_fraction < max(OFFLOAD_FRACTIONS):
        # Offload was tried, and host memory stopped it short of the whole optimizer state.
        relax += f", more host memory (the profile's host.memory_gib, now {cluster.host.memory_gib:g} a node)"
    if options.optimizer.main_grads_dtype == "fp32":
        relax += ", BF16 gradients (--main-grads-dtype bf16; this changes the numerics)"
    if parallel.recompute != "full":
        relax = "a shorter sequence, full recompute, " + relax
    if margin:
        relax += f", a smaller --memory-margin (now {options.memory_margin})"
    if constraints:
        relax += f", fewer constraints ({constraints})"
    held = f" ({human_bytes(hbm)} less the {human_bytes(margin)} margin)" if margin else ""
    return InfeasiblePlanError(
        f"'{model.name}' does not fit on {cluster.world_size} GPUs of {human_bytes(capacity)}{held} at sequence "
        f"{training.seq_len}: the least memory any of {len(layouts)} layouts needs is {human_bytes(peak)} per GPU "
        f"(tp {parallel.tp}, pp {parallel.pp}, ep {parallel.ep}, recompute {parallel.recompute}; "
        f"{parallel.optimizer.summary}), so it needs at "
        f"least {needed} GPUs of this size. Relax: {relax}."
    )


def _offload_refusal(training: TrainingSpec, cluster: ClusterProfile, options: SearchOptions) -> str | None:
    """Why the search did not try optimizer CPU offload, or None if it did."""
    if not framework(options.framework).optimizer_settings:
        return f"Megatron-LM has it; --framework {options.framework} does not"
    if not options.memory_relief:
        return "now off: --optimizer-offload none"
    if cluster.host is None:
        return f"profile '{cluster.name}' states no host memory and copy bandwidth: give it a host: block"
    if options.optimizer.offloads or options.optimizer.exp_avg_dtype != "fp32":
        return None
    ladder = optimizer_ladder(options.optimizer, training.precision, True, framework(options.framework))
    return None if any(rung.offloads for rung in ladder) else "not with these settings"


def alters_model(parallel: ParallelConfig) -> bool:
    """The plan carries a model-altering technique (TA-MoE, condensation, sequence migration)."""
    return bool(techniques(parallel.dispatcher))


def _refuse_what_cannot_be_in_a_plan(options: SearchOptions, cluster: ClusterProfile) -> None:
    """A named dispatcher or an offered technique that no plan may carry is refused before any search."""
    target = framework(options.framework)
    other = "--framework moeplan (the bundled runtime) runs it"
    if not target.model_altering:
        for field in techniques(options):
            name, flag = MODEL_ALTERING[field]
            raise InfeasiblePlanError(
                f"{flag} ({name}) has no {target.label} equivalent, so no plan for --framework {target.name} "
                f"can carry it; {other}, or drop the flag."
            )
    if not options.dispatchers_named:
        return
    refusals = []
    for name in options.dispatchers:
        spec = spec_for(name)
        family = dispatcher(spec.kind)
        refusal = target.dispatcher_refusal(spec.kind, spec.backend)
        if refusal:
            hint = other if target.name != "moeplan" else ""
            refusals.append(f"--dispatcher {name}: {refusal}" + (f"; {hint}" if hint else ""))
        elif family.backends and not runnable_backends(
            spec.kind, (spec.backend,) if spec.backend else None, cluster.gpu
        ):
            broken = family.hardware_rules(spec, cluster.gpu)
            refusals.append(f"--dispatcher {name}: {name} {'; '.join(broken)}")
    if len(refusals) == len(options.dispatchers):
        raise InfeasiblePlanError(" ".join(f"{r}." for r in refusals))


def _memory(
    memory_model: MemoryModel, p: ParallelConfig, memo: dict[tuple[object, ...], MemoryCoefficients]
) -> MemoryCoefficients:
    """Memory coefficients, shared by layouts that differ only in EP overlap or dispatcher backend."""
    key = (p.tp, p.cp, p.pp, p.vpp, p.ep, p.etp, p.dp, p.edp, p.micro_batch, p.sequence_parallel, p.recompute,
           p.recompute_modules, p.dispatcher.kind, p.distributed_optimizer, p.fsdp, p.optimizer,
           p.fp8_param_gather, p.dp_sharding, p.cuda_graphs, p.tp_comm_overlap)  # fmt: skip
    if key not in memo:
        model, training = memory_model.model, memory_model.training
        memo[key] = memory_model.coefficients(p, layout_imbalance(model, training, p))
    return memo[key]


class _MemoryRelief:
    """The settings of ``optimizer_ladder`` for the layouts that do not fit with the options' own.

    Each rung whose floors fit (GPU and host) is a layout of its own, not only the first (a later rung adds
    host work but frees memory, which may let the ILP split the layers better), so the search stays exact
    over its space. They are made only when the search reaches their layout: it waits in bound order under
    a key no greater than any rung's bound (``expand``), and most never come up. Each rung scales the
    optimizer state (the GPU's share, and the host's) by its bytes per parameter, so its floors follow from
    the layout's without pricing it: the state is linear in the layers' parameters. (An offloading rung of
    a layout that gathers FP8 weights is the exception: it gives the gather up, ``_start``.)
    """

    def __init__(
        self, model: ModelSpec, training: TrainingSpec, cluster: ClusterProfile, options: SearchOptions,
        capacity: float, price: Callable[[ParallelConfig], MemoryCoefficients],
    ) -> None:  # fmt: skip
        self.model, self.capacity, self.price = model, capacity, price
        self.base, self.precision = options.optimizer, training.precision
        self.host_capacity = host_capacity_per_gpu(cluster)
        target = framework(options.framework)
        ladder = optimizer_ladder(options.optimizer, training.precision, cluster.host is not None, target)
        base_gpu, _ = optimizer_bytes_per_param(options.optimizer, training.precision)
        self.rungs: list[tuple[OptimizerConfig, float, float]] = []
        """Each rung with its GPU and host optimizer state as shares of the options' own GPU state."""
        for rung in ladder if options.memory_relief else ():
            gpu, host = optimizer_bytes_per_param(rung, training.precision)
            self.rungs.append((rung, gpu / base_gpu, host / base_gpu))

    def _start(
        self, layout: ParallelConfig, memory: MemoryCoefficients, rung: OptimizerConfig
    ) -> tuple[ParallelConfig, MemoryCoefficients]:
        """The layout a rung starts from and its memory (with the options' optimizer settings).
        Megatron offloads the optimizer of FP8 primary weights only under the delayed recipe (not
        moeplan's), so an offloading rung keeps BF16 weights, and with them Transformer Engine's FP8
        weight cache: its memory is priced again without ``fp8_param_gather``."""
        if not (rung.offloads and layout.fp8_param_gather):
            return layout, memory
        ungathered = layout.model_copy(update={"fp8_param_gather": False})
        return ungathered, self.price(ungathered)

    def _floors(
        self, layout: ParallelConfig, memory: MemoryCoefficients, floor: float
    ) -> Iterator[tuple[OptimizerConfig, float]]:
        """(rung, GPU floor) of each rung whose host floor fits."""
        for rung, gpu_share, host_share in self.rungs:
            _, start = self._start(layout, memory, rung)
            start_floor = floor if start is memory else memory_floor(start, self.model)
            state = optimizer_floor_bytes(start, self.model)
            if state * host_share <= self.host_capacity:
                yield rung, start_floor - state * (1.0 - gpu_share)

    def fitting(
        self, layout: ParallelConfig, memory: MemoryCoefficients, floor: float
    ) -> list[OptimizerConfig]:
        """The rungs with which ``layout`` (of this memory and floor) fits (none for one that fits without)."""
        if floor <= self.capacity:
            return []
        return [rung for rung, lighter in self._floors(layout, memory, floor) if lighter <= self.capacity]

    def made(
        self, layout: ParallelConfig, memory: MemoryCoefficients, rung: OptimizerConfig
    ) -> tuple[ParallelConfig, MemoryCoefficients]:
        """The layout with a rung's settings and its memory."""
        start, start_memory = self._start(layout, memory, rung)
        made = start.model_copy(update={"optimizer": rung})
        return made, with_optimizer(start_memory, self.base, rung, self.precision)

    def least(
        self, layouts: list[ParallelConfig], memories: list[MemoryCoefficients], floors: list[float]
    ) -> list[tuple[float, ParallelConfig]]:
        """Each layout's least floor over its own settings and the rungs whose host floor fits, with those
        settings (what an infeasible search reports)."""
        out = []
        for layout, memory, floor in zip(layouts, memories, floors, strict=True):
            lightest = min(self._floors(layout, memory, floor), key=lambda item: item[1], default=None)
            if lightest is not None and lightest[1] < floor:
                out.append((lightest[1], self.made(layout, memory, lightest[0])[0]))
            else:
                out.append((floor, layout))
        return out


def solve(
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterProfile,
    options: SearchOptions | None = None,
    time_limit_s: float = 60.0,
    gap: float = 1e-6,
    exhaustive: bool = False,
    top_k: int = 5,
    *,
    model_ref: ModelRef | None = None,
    cluster_ref: ClusterRef | None = None,
    progress: Callable[[SolveProgress], None] | None = None,
) -> SearchResult:
    """The best plan over the search space, proven optimal unless the time limit cut the search.

    ``model_ref`` and ``cluster_ref`` record where the inputs came from (``planner.catalog.refs``); without
    them the plan names a catalog model and a bundled profile. ``progress``, if given, is called as the
    search goes (``planner.search.progress``).
    """
    start = time.perf_counter()
    options = options or SearchOptions()
    # The GPU's precision rule holds for every layout or for none: refuse it once, with what to use.
    training = with_gpu_precision(training, cluster.gpu)
    for violation in precision_rules(training, cluster.gpu):
        raise SpecError(f"{violation} (cluster '{cluster.name}').")
    _refuse_what_cannot_be_in_a_plan(options, cluster)
    _refuse_impossible_constraints(model, training, cluster, options)
    profile, margin = cluster, memory_margin_bytes(options.memory_margin, cluster.gpu.hbm_gib * GIB)
    # The search sees GPUs smaller by the margin, so every memory rule (floors, the ILP's rows, the
    # estimate's ``fits``) holds each rank to HBM less the margin; the plan names the real profile.
    cluster = _held_to(cluster, margin)
    world, per_node = cluster.world_size, cluster.num_gpus_per_node
    layouts = list(candidate_layouts(model, training, world, per_node, options, cluster.gpu))
    report = ProgressReporter(progress, start, len(layouts))
    report(0, 0, None)
    capacity = cluster.gpu.hbm_gib * GIB
    memo: dict[tuple[object, ...], MemoryCoefficients] = {}
    # Memory first: it needs no timing, and a layout whose memory floor does not fit under any stage
    # assignment is not priced at all (for a model that fits nowhere this is the whole search).
    memory_model = MemoryModel(model, training)
    memories = [_memory(memory_model, layout, memo) for layout in layouts]
    floors = [memory_floor(memory, model) for memory in memories]
    enumerated = len(layouts)
    relief = _MemoryRelief(
        model, training, cluster, options, capacity, lambda p: _memory(memory_model, p, memo)
    )
    host_capacity = host_capacity_per_gpu(cluster)
    fitting = [
        i
        for i, floor in enumerate(floors)
        if floor <= capacity
        and (not layouts[i].optimizer.offloads or host_floor(memories[i], model) <= host_capacity)
    ]
    relieved = {
        i: rungs for i in range(enumerated) if (rungs := relief.fitting(layouts[i], memories[i], floors[i]))
    }
    """The layouts that fit only with rungs of the ladder, and those rungs (made when reached)."""
    reachable = len(fitting) + len(relieved)
    """Layouts that may fit: what the progress reports as priced."""

    def infeasible() -> InfeasiblePlanError:
        # The enumerated layouts only: the rungs made since are already counted in their layouts' least.
        least = relief.least(layouts[:enumerated], memories[:enumerated], floors[:enumerated])
        return _infeasible(model, training, profile, least, options)

    if not reachable:
        raise infeasible()
    cache = LayerCache()
    priced: dict[int, LayoutCosts] = {}
    """The layouts priced so far: only those the search reaches in bound order (``bounds``)."""

    def priced_bound(index: int) -> float:
        priced[index] = layout_costs(model, training, layouts[index], cluster, cache, memories[index])
        return lower_bound(priced[index])

    # Each layout waits under a bound from its per-layer seconds alone (no greater than its lower bound).
    rates: dict[OptimizerConfig, OptimizerRates] = {}

    def per_layer_bound(p: ParallelConfig) -> float:
        seconds = layer_seconds(model, training, p, cluster, cache)
        return average_bound(model, p, seconds, num_microbatches(training, p))

    def cheap(index: int) -> float:
        p = layouts[index]
        if p.optimizer not in rates:
            rates[p.optimizer] = optimizer_rates(p.optimizer, training.precision, cluster)
        return per_layer_bound(p) + optimizer_floor(memories[index], model, rates[p.optimizer])

    def expand(index: int) -> list[tuple[float, int]]:
        """The rungs of a layout that fits only with them, as layouts of their own (``_MemoryRelief``)."""
        made = []
        for rung in relieved[index]:
            layout, memory = relief.made(layouts[index], memories[index], rung)
            layouts.append(layout)
            memories.append(memory)
            floors.append(memory_floor(memory, model))
            made.append((cheap(len(layouts) - 1), len(layouts) - 1))
        return made

    # A relieved layout waits under its bound without the optimizer step, no greater than any rung's.
    waiting = [(per_layer_bound(layouts[i]), i) for i in relieved]
    bounds = in_bound_order([(cheap(i), i) for i in fitting], priced_bound, waiting, expand)
    seeds: list[tuple[float, int]] = []
    """The first layouts of ``bounds``, taken by the seeding; ``bounds`` goes on from the next."""
    best: tuple[float, int, tuple[int, ...]] | None = None
    proven = True
    solved: list[Alternative] = []
    indices: list[int] = []
    """Each solved plan's layout, an index into ``layouts`` (the enumeration order)."""
    visits: list[int] = []
    """When each solved plan's layout was visited: -1 for the seeds, else its place in bound order."""
    deferred: list[tuple[float, int, int]] = []
    """(memory bound, place in bound order, index) of the layouts left unsolved because their
    ``memory_bound`` is above the incumbent: none of their plans can win or tie, but one may be among
    the best of other structures (``alternatives``), so they are solved at the end if so."""
    evens: dict[int, Estimate] = {}

    def record(index: int, sizes: tuple[int, ...], objective: float, layout_proven: bool, visit: int) -> None:
        """Add the plan of layout ``index`` with these chunk sizes, priced by ``evaluate``, to ``solved``."""
        parallel = priced[index].context.parallel.model_copy(update={"layers_per_stage": sizes})
        result = evaluate(priced[index], split_chunks(model, parallel))
        # The ILP prices exactly what evaluate() prices; at a proven optimum a mismatch beyond the solver's
        # tolerances is a bug in one of them. (At a time limit the incumbent may carry slack in T.)
        # evaluate() is the source of truth for what is reported.
        if layout_proven:
            assert math.isclose(objective, result.step_time_s, rel_tol=1e-5, abs_tol=1e-9), (
                objective,
                result.step_time_s,
            )
        solved.append(Alternative(parallel, result))
        indices.append(index)
        visits.append(visit)

    def even_split(index: int) -> Estimate:
        """The estimate of a layout's even stage split (evaluated once)."""
        if index not in evens:
            evens[index] = evaluate(priced[index], split_chunks(model, priced[index].context.parallel))
        return evens[index]

    if not exhaustive:
        # Seed the incumbent with the even splits of the most promising layouts: each is an
        # achievable plan, so every layout whose bound is no better than it is pruned unsolved.
        for bound, index in itertools.islice(bounds, SEED_LAYOUTS):
            seeds.append((bound, index))
            if best is not None and bound > best[0] * (1 + SEED_MARGIN):
                break  # no even split from here on can be faster: each is at least its layout's bound
            costs = priced[index]
            even = even_split(index)
            if even.fits and (best is None or even.step_time_s < best[0] - 1e-12):
                sizes = tuple(d + m for d, m in split_chunks(model, costs.context.parallel))
                best = (even.step_time_s, index, sizes)
                solved.append(
                    Alternative(costs.context.parallel.model_copy(update={"layers_per_stage": sizes}), even)
                )
                indices.append(index)
                visits.append(-1)
    report(reachable, len(solved), best)
    stopped_at: tuple[int, tuple[float, int]] | None = None
    """(place in bound order, (bound, index)) of the layout the branch and bound stopped at."""
    for visit, (bound, index) in enumerate(itertools.chain(seeds, bounds)):
        # Branch and bound; the exhaustive oracle visits every layout so that it shares nothing with it.
        # Layouts tied with the incumbent are solved too: the tie rule below must see them all.
        if best is not None and bound > best[0] * (1 + TIE_TOLERANCE) and not exhaustive:
            stopped_at = (visit, (bound, index))
            break
        costs = priced[index]
        remaining = time_limit_s - (time.perf_counter() - start)
        if remaining <= 0:
            proven = False
            break
        layout_proven = True
        if exhaustive:
            found = _exhaustive(costs)
            if found is None:
                continue
            objective, sizes = found
        elif even_split(index).fits and even_split(index).step_time_s <= bound * (1 + gap):
            # The even split already meets this layout's lower bound: no assignment can beat it.
            objective = even_split(index).step_time_s
            sizes = tuple(d + m for d, m in split_chunks(model, costs.context.parallel))
        else:
            floor = memory_bound(costs, capacity)
            if floor == math.inf:
                continue  # no split fits: what the ILP would prove (infeasible), without building it
            if best is not None and floor > best[0] * (1 + TIE_TOLERANCE):
                deferred.append((floor, visit, index))
                continue
            _load_ilp()  # PuLP is imported only when a layout is solved
            from planner.search.ilp import solve_stages

            stages = solve_stages(costs, min(remaining, LAYOUT_TIME_LIMIT_S), gap)
            if stages.result.objective is None:
                proven = proven and stages.result.status in ("optimal", "infeasible")
                continue
            proven = proven and stages.result.optimal
            layout_proven = stages.result.optimal
            objective, sizes = stages.result.objective, stages.layers_per_chunk
        record(index, sizes, objective, layout_proven, visit)
        if best is None or solved[-1].estimate.step_time_s < best[0] - 1e-12:
            best = (solved[-1].estimate.step_time_s, index, sizes)
        report(reachable, len(solved), best)
    if best is None:
        report(reachable, len(solved), best, done=True)
        raise infeasible()
    winner = _canonical_winner(solved, indices, priced, exhaustive)

    def wanted(floor: float, index: int) -> bool | None:
        """Whether layout ``index``, none of whose plans beats ``floor``, could be among the alternatives
        (the top_k best of the other structures); None when no layout with a floor this high can be."""
        others = _best_by_structure(solved, visits, winner)
        if top_k <= 0 or (len(others) >= top_k and floor > others[top_k - 1].estimate.step_time_s):
            return None
        structure = _structure(priced[index].context.parallel)
        same = [alt for alt in others if alt.structure == structure]
        return not (structure == winner.structure or (same and floor > same[0].estimate.step_time_s))

    def solve_alternative(index: int, visit: int, remaining: float) -> None:
        _load_ilp()  # PuLP is imported only when a layout is solved
        from planner.search.ilp import solve_stages

        stages = solve_stages(priced[index], min(remaining, LAYOUT_TIME_LIMIT_S), gap)
        if stages.result.objective is not None:
            record(index, stages.layers_per_chunk, stages.result.objective, stages.result.optimal, visit)
            report(reachable, len(solved), best)

    # The deferred layouts that could be among the alternatives, solved as the loop would have solved
    # them: cheapest bound first, each only while its bound is within the top_k-th alternative's time
    # and its own structure's best (no plan of a layout above both could change what is reported).
    for floor, visit, index in sorted(deferred):
        remaining = time_limit_s - (time.perf_counter() - start)
        take = wanted(floor, index)
        if take is None or remaining <= 0:
            break
        if take:
            solve_alternative(index, visit, remaining)
    # Then the layouts the branch and bound did not reach, in bound order, by the same rule (a layout's
    # bound is a floor on its plans): the alternatives are the best of each other structure, not the
    # layouts met by chance before the winner was proven.
    if stopped_at is not None:
        first, stopped = stopped_at
        for visit, (bound, index) in enumerate(itertools.chain([stopped], bounds), start=first):
            remaining = time_limit_s - (time.perf_counter() - start)
            take = wanted(bound, index)
            if take is None or remaining <= 0:
                break
            if not take:
                continue
            if even_split(index).fits and even_split(index).step_time_s <= bound * (1 + gap):
                sizes = tuple(d + m for d, m in split_chunks(model, priced[index].context.parallel))
                record(index, sizes, even_split(index).step_time_s, True, visit)
            else:
                # The sharper bound with memory: a layout that cannot beat what is reported is not solved.
                floor = memory_bound(priced[index], capacity)
                if floor < math.inf and wanted(floor, index):
                    solve_alternative(index, visit, remaining)
    report(reachable, len(solved), best, done=True)
    others = _best_by_structure(solved, visits, winner)
    plan = Plan(
        model=model_ref or ModelRef(name=model.name or "model", source="catalog"),
        cluster=cluster_ref or ClusterRef(name=profile.name, source="bundled"),
        num_nodes=cluster.num_nodes,
        num_gpus_per_node=cluster.num_gpus_per_node,
        num_gpus=cluster.world_size,
        training=training,
        parallel=winner.parallel,
        estimate=winner.estimate,
        solver=SolverInfo(
            status=("exhaustive" if exhaustive else "optimal") if proven else "time limit",
            optimal=proven,
            gap=0.0 if exhaustive else gap,
            solve_time_s=time.perf_counter() - start,
            candidates=len(layouts),
            memory_margin_bytes=margin,
        ),
        provenance=PlanProvenance(
            moeplan_version=__version__, model_source=model.source, cluster_source=cluster.provenance.source
        ),
    )
    return SearchResult(plan, tuple(others[:top_k]), len(layouts), len(solved))


def _best_by_structure(
    solved: list[Alternative], visits: list[int], winner: Alternative
) -> list[Alternative]:
    """The fastest plan of each structure but the winner's, fastest first; among equal times the first
    visited (the seeds, then bound order)."""
    others: dict[tuple[int, ...], Alternative] = {}
    in_order = [alt for _, _, alt in sorted(zip(visits, range(len(solved)), solved, strict=True))]
    for alt in sorted(in_order, key=lambda a: a.estimate.step_time_s):
        if alt.structure != winner.structure and alt.structure not in others:
            others[alt.structure] = alt
    return list(others.values())
