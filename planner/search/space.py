"""The layouts the solver considers: small generators of valid degrees, combined with itertools.product.

A layout fixes everything except how layers are assigned to pipeline stages (the ILP decides that):
TP (inside a node, dividing heads and compatible with query groups), CP (only for sequences of 16K
and more), PP and virtual stages (at least one layer per chunk), EP and ETP (parallel folding:
ETP in {1, TP}), micro-batch, recompute, dispatcher and EP overlap; the model-state settings are the
user's, and ``optimizer_ladder`` lists those the solver adds for a layout that does not fit without them. Rules across objects come from
``planner.feasibility`` except the layer-divisibility rule, which uneven stages lift.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from planner.costmodel.dispatchers import dispatcher, spec_for
from planner.feasibility import Violation, choice_rules, degree_rules, grouped_gemm_supported, hardware_rules
from planner.frameworks import Framework, framework
from planner.schema import (
    DEFAULT_MEMORY_MARGIN,
    DispatcherSpec,
    GpuSpec,
    ModelSpec,
    OptimizerConfig,
    ParallelConfig,
    SearchDegree,
    TrainingSpec,
)

__all__ = [
    "OFFLOAD_FRACTIONS",
    "SearchOptions",
    "candidate_layouts",
    "divisors",
    "optimizer_ladder",
    "recompute_choices",
    "requested_backends",
]


MAX_TP = 8
"""Widest tensor parallelism the search tries unless the user fixes tp."""
OFFLOAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""Optimizer CPU offload fractions the search tries (``--optimizer-offload-fraction``)."""


def divisors(n: int) -> list[int]:
    """Positive divisors of n, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True, slots=True)
class SearchOptions:
    """What the search may vary. Model-altering techniques stay off unless the user enables them."""

    micro_batches: tuple[int, ...] = (1, 2, 4)
    virtual_stages: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    dispatchers: tuple[str, ...] = ("alltoall", "hierarchical")
    """Dispatcher names to consider: kinds (every kernel library of the kind) or kernel libraries
    (``deepep``: the hierarchical kind on DeepEP only); see ``planner.costmodel.dispatchers.spec_for``."""
    overlap: tuple[bool, ...] = (False, True)
    recompute: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("none", ()),
        ("selective", ("core_attn",)),
        ("selective", ("layernorm", "moe_act")),
        ("selective", ("mla_up_proj",)),
        ("full", ()),
    )
    """Recompute choices; those naming ``mla_up_proj`` apply to MLA models only."""
    a2a_chunks: tuple[int, ...] = (2, 4)
    """Chunk counts tried for the monta dispatcher when it is among ``dispatchers``."""
    fixed: tuple[tuple[SearchDegree, int], ...] = ()
    """Degrees the user fixed (e.g. (("tp", 8),)); the search keeps them, even outside its defaults
    (a fixed tp may exceed MAX_TP or the node)."""
    maxima: tuple[tuple[SearchDegree, int], ...] = ()
    """Upper bounds on degrees (e.g. (("ep", 64),)): they narrow the search's own ranges."""
    memory_margin: str = DEFAULT_MEMORY_MARGIN
    """Memory every GPU keeps free (``planner.schema.margin``): 5%, 0.05 or 4GiB."""
    topology_aware_routing: bool = False
    """Offer TA-MoE's topology-aware dispatch (model-altering: only when the user asks). Offered, the
    search tries each layout with and without it, and a plan carries it only when strictly faster."""
    condense_fraction: float = 0.0
    """Offer Luffy's token condensation at this rho (model-altering; offered like TA-MoE)."""
    sequence_migration: bool = False
    """Offer Luffy's sequence migration (model-altering; offered like TA-MoE)."""
    framework: str = "megatron"
    """The framework that launches the plan (``planner.frameworks``): only what it expresses is searched."""
    optimizer: OptimizerConfig = OptimizerConfig()
    """The model-state settings every layout starts from: Megatron-LM's defaults, or the user's
    (``solve --main-grads-dtype``, ``--exp-avg-dtype``, ``--optimizer-offload F``)."""
    memory_relief: bool = True
    """A layout that does not fit with ``optimizer`` may also be tried with the numerics-preserving
    settings of ``optimizer_ladder`` (``--optimizer-offload none`` turns this off)."""
    fp8_param_gather: bool = True
    """``--fp8-param-gather`` wherever it gathers fewer bytes: FP8 (blockwise) training in Megatron-LM with
    the distributed optimizer and no CPU offload. It keeps the same bytes of weights (the FP8 data and its
    transpose) and the same numerics as the FP8 weights the GEMMs use, so the search sets it rather than
    trying each layout without (``solve --no-fp8-param-gather`` turns it off)."""
    cuda_graphs: tuple[str, ...] = ()
    """CUDA graph scopes to offer (``solve --cuda-graphs``): each layout is also tried with them where the
    rules allow (``feasibility`` rule 15), and the plan carries them only when that prices faster,
    their static buffers counted. Empty: every kernel launched eagerly (Megatron-LM's default)."""
    tp_comm_overlap: bool = False
    """Offer Transformer Engine's TP communication overlap (``solve --tp-comm-overlap``): each layout with tp
    above 1 and sequence parallelism is also tried with it where the rules allow (``feasibility`` rule 17),
    and the plan carries it only when that prices faster, its userbuffers counted. Off: Megatron-LM's
    default."""
    dispatchers_named: bool = False
    """The user named ``dispatchers``: every plan uses one of them (a layout without expert parallelism
    moves no token, so it counts as the flat all-to-all and is searched only when that is named)."""


def optimizer_ladder(
    base: OptimizerConfig, precision: str, host_known: bool, target: Framework
) -> tuple[OptimizerConfig, ...]:
    """The settings a layout that does not fit with ``base`` may try, in order of step time: each keeps
    what the model computes (FP32 state, exact master weights).

    1. The precision-aware optimizer with FP32 moments: under BF16 its master weights are the 16-bit
       remainders of their FP32 values, exact and 2 bytes a parameter smaller (``costmodel.memory``).
    2. Optimizer CPU offload of ``OFFLOAD_FRACTIONS`` of the state, copies overlapped with the host's
       Adam: only on a profile that states its host (memory and copy bandwidth), and with FP32 moments.
    """
    if not target.optimizer_settings:
        return ()
    rungs = []
    if not base.precision_aware and precision == "bf16":
        rungs.append(base.model_copy(update={"precision_aware": True}))
    if host_known and not base.offloads and base.exp_avg_dtype == "fp32":
        rungs += [
            base.model_copy(update={"precision_aware": True, "offload_fraction": f, "overlap_offload": True})
            for f in OFFLOAD_FRACTIONS
        ]
    return tuple(rungs)


def recompute_choices(granularity: str | None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The search's recompute choices of one granularity (``--recompute``), or all of them (None)."""
    every = SearchOptions().recompute
    return every if granularity is None else tuple(r for r in every if r[0] == granularity)


def requested_backends(names: tuple[str, ...]) -> dict[str, tuple[str, ...] | None]:
    """Kinds to try, each with the kernel libraries allowed (None: all of them), in the order named."""
    requested: dict[str, tuple[str, ...] | None] = {}
    for name in names:
        spec = spec_for(name)
        if spec.backend is None:
            requested[spec.kind] = None
        elif spec.kind not in requested or requested[spec.kind] is not None:
            requested[spec.kind] = (*(requested.get(spec.kind) or ()), spec.backend)
    return requested


def runnable_backends(
    kind: str, backends: tuple[str, ...] | None, gpu: GpuSpec | None
) -> tuple[str, ...] | None:
    """The kernel libraries of ``kind`` (None: all) whose hardware needs ``gpu`` meets."""
    family = dispatcher(kind)
    if gpu is None or not family.backends:
        return backends
    named = family.backends if backends is None else backends
    return tuple(b for b in named if not family.hardware_rules(DispatcherSpec(kind=kind, backend=b), gpu))


class _Rules:
    """Feasible by every rule except layer divisibility (uneven stages lift it), in the target framework,
    for the layouts of one search. The rules that read few fields are checked once: those of the degrees
    (``feasibility.degree_rules``) once per degree tuple, the GPU's (``hardware_rules``) once per
    dispatcher spec, the others (``choice_rules``, the framework's) for each layout."""

    def __init__(
        self,
        model: ModelSpec,
        training: TrainingSpec,
        world: int,
        gpu: GpuSpec | None,
        target: Framework,
        optimizer: OptimizerConfig,
        fp8_param_gather: bool = False,
        cuda_graphs: tuple[str, ...] = (),
        tp_comm_overlap: bool = False,
    ) -> None:
        self.model, self.training, self.world, self.gpu, self.target = model, training, world, gpu, target
        self.optimizer = optimizer
        self.cuda_graphs = ParallelConfig(cuda_graphs=cuda_graphs).cuda_graphs  # validated, in order
        """Scopes each layout is also tried with (``SearchOptions.cuda_graphs``)."""
        self.tp_comm_overlap = tp_comm_overlap and target.tp_comm_overlap
        """Each layout with sequence parallelism is also tried with it (``SearchOptions.tp_comm_overlap``)."""
        self.fp8_param_gather = (
            fp8_param_gather
            and training.precision == "fp8"
            and target.fp8_params
            and target.distributed_optimizer
            and not optimizer.offloads
        )
        """Every layout of the search gathers FP8 weights (``SearchOptions.fp8_param_gather``)."""

    def _counts(self, violation: Violation) -> bool:
        if violation.field in ("pp*vpp", "layers_per_stage"):
            return False
        return not violation.megatron_only or self.target.megatron_rules

    def degrees_free(self, parallel: ParallelConfig) -> bool:
        """``parallel``'s degrees break no rule (``feasibility.degree_rules``), whatever its other choices."""
        return not any(self._counts(v) for v in degree_rules(self.model, self.training, parallel, self.world))

    def hardware_free(self, spec: DispatcherSpec) -> bool:
        """The GPU runs what a layout with this dispatcher asks of it (all that ``hardware_rules`` reads of
        a layout is its dispatcher and ``grouped_gemm``, which is the same for every layout)."""
        if self.gpu is None:
            return True
        parallel = ParallelConfig(dispatcher=spec, grouped_gemm=grouped_gemm_supported(self.gpu))
        return not any(self._counts(v) for v in hardware_rules(self.model, self.training, parallel, self.gpu))

    def free(self, parallel: ParallelConfig) -> bool:
        """Free of the rest, for a layout whose degrees and dispatcher passed theirs."""
        if self.target.rules(self.model, self.training, parallel):
            return False
        return not any(self._counts(v) for v in choice_rules(self.model, self.training, parallel))


def options_graph_scopes(model: ModelSpec, training: TrainingSpec, options: SearchOptions) -> tuple[str, ...]:
    """The scopes ``options.cuda_graphs`` offers: as given, or for ``("auto",)`` Megatron-Bridge's advice
    for Transformer Engine's per-layer graphs (docs/training/cuda-graphs.md, SKILL.md "Quick Decision"):
    ``attn``, with ``mlp`` where the model has dense layers, and ``moe_router`` and ``moe_preprocess``
    for MoE layers (without ``moe_preprocess`` under capacity routing, which it cannot capture)."""
    if options.cuda_graphs != ("auto",):
        return options.cuda_graphs
    scopes = ["attn"]
    if model.num_dense_layers:
        scopes.append("mlp")
    if model.is_moe:
        scopes.append("moe_router")
        if training.routing != "capacity":
            scopes.append("moe_preprocess")
    return tuple(scopes)


def offered(options: SearchOptions, spec: DispatcherSpec, ep: int) -> list[DispatcherSpec]:
    """``spec`` without and with each model-altering technique the user offered that changes its traffic."""
    if ep == 1:
        return [spec]
    choices: dict[str, list[object]] = {}
    if options.topology_aware_routing and dispatcher(spec.kind).topology_aware:
        choices["topology_aware_routing"] = [False, True]
    if options.condense_fraction:
        choices["condense_fraction"] = [0.0, options.condense_fraction]
    if options.sequence_migration:
        choices["sequence_migration"] = [False, True]
    names = list(choices)
    return [
        spec.model_copy(update=dict(zip(names, values, strict=True)))
        for values in itertools.product(*(choices[n] for n in names))
    ]


def candidate_layouts(
    model: ModelSpec,
    training: TrainingSpec,
    world: int,
    gpus_per_node: int,
    options: SearchOptions,
    gpu: GpuSpec | None = None,
) -> Iterator[ParallelConfig]:
    """Every layout to price, in a deterministic order; with ``gpu``, only what that GPU runs."""
    fixed, maxima = dict(options.fixed), dict(options.maxima)

    def pick(
        name: SearchDegree, values: list[int], valid: Callable[[int], bool] = lambda _: True
    ) -> list[int]:
        """The search's own ``values`` (each valid) up to the user's bound, or the user's fixed value if
        valid: a fixed value may lie outside the search's range (tp above 8), never break a rule."""
        if name in fixed:
            return [fixed[name]] if valid(fixed[name]) else []
        return [v for v in values if valid(v) and v <= maxima.get(name, v)]

    target = framework(options.framework)
    rules = _Rules(
        model, training, world, gpu, target, options.optimizer, options.fp8_param_gather,
        options_graph_scopes(model, training, options), options.tp_comm_overlap,
    )  # fmt: skip
    choices: dict[bool, list[_Choice]] = {}
    """The choices of layouts with ep 1, and those of layouts with ep above 1."""
    experts = model.num_experts or 1

    # The rules a fixed value must meet too (the search's own values are drawn to meet them).
    def pipeline_rule(rest: int) -> Callable[[int], bool]:
        return lambda p: rest % p == 0 and p <= model.num_layers

    def virtual_rule(pp: int) -> Callable[[int], bool]:
        return lambda v: (v == 1 or pp > 1) and pp * v <= model.num_layers

    def expert_rule(pp: int) -> Callable[[int], bool]:
        return lambda e: experts % e == 0 and (world // pp) % e == 0

    # TP stays inside the scale-up domain and at most 8 wide: its all-gather/reduce-scatter per layer
    # outgrows its gain beyond that (Megatron's guidance; larger TP can still be fixed by the user).
    tps = pick("tp", [t for t in divisors(world) if t <= min(gpus_per_node, MAX_TP)])
    cps = pick("cp", [c for c in (1, 2, 4, 8) if c == 1 or training.seq_len >= 16384])
    for tp, cp in itertools.product(tps, cps):
        if world % (tp * cp):
            continue
        rest = world // (tp * cp)
        for pp in pick("pp", divisors(rest), pipeline_rule(rest)):
            dp = rest // pp
            vpps = pick("vpp", list(options.virtual_stages), virtual_rule(pp))
            eps = pick("ep", divisors(experts), expert_rule(pp))
            for vpp, ep, mbs in itertools.product(
                vpps, eps, pick("micro_batch", list(options.micro_batches))
            ):
                if training.global_batch % (mbs * dp):
                    continue
                for etp in pick("etp", sorted({1, tp})):
                    if (world // pp) % (etp * ep):
                        continue
                    if (ep == 1) not in choices:
                        choices[ep == 1] = _layout_choices(model, options, rules, ep)
                    yield from _layouts(rules, choices[ep == 1], (tp, cp, pp, vpp, ep, etp, mbs, dp))


_Choice = tuple[str, tuple[str, ...], DispatcherSpec, bool, bool]
"""(recompute, recompute_modules, dispatcher, a2a_overlap, the dispatcher deduplicates over TP)."""


def _layout_choices(model: ModelSpec, options: SearchOptions, rules: _Rules, ep: int) -> list[_Choice]:
    """What a layout of the given degrees may choose besides them, in the search's order, without the
    dispatchers the GPU does not run; the same for every ``ep`` above 1."""
    gpu, target = rules.gpu, rules.target
    requested = requested_backends(options.dispatchers)
    if ep == 1:
        # Without expert parallelism no token moves, and the flat all-to-all stands for every dispatcher.
        if options.dispatchers_named and "alltoall" not in requested:
            return []
        requested = {"alltoall": None}
    specs: list[DispatcherSpec] = []
    allowed: dict[bool, list[DispatcherSpec]] = {True: [], False: []}
    for kind, backends in requested.items():
        runnable = runnable_backends(kind, backends, gpu)
        variants = {o: dispatcher(kind).variants(runnable, options.a2a_chunks, o) for o in (True, False)}
        if not target.kernel_libraries:  # the framework runs its own kernels: no backend to choose
            variants = {o: [s.model_copy(update={"backend": None}) for s in v] for o, v in variants.items()}
        for o in (True, False):
            allowed[o] += [offer for s in variants[o] for offer in offered(options, s, ep)]
        specs += [s for s in dict.fromkeys(allowed[True] + allowed[False]) if s not in specs]
    recomputes = options.recompute if target.recompute else (("none", ()),)
    overlaps = options.overlap if target.a2a_overlap else (False,)
    out: list[_Choice] = []
    for (recompute, modules), spec, overlap in itertools.product(recomputes, specs, overlaps):
        if overlap and (ep == 1 or not dispatcher(spec.kind).overlappable):
            continue
        if spec not in allowed[overlap]:
            continue
        if modules and not model.is_moe and "moe_act" in modules:
            continue
        if "mla_up_proj" in modules and model.attention != "mla":
            continue
        if not rules.hardware_free(spec):
            continue
        ParallelConfig(recompute=recompute, recompute_modules=modules)  # validated here, copied in _layouts
        out.append((recompute, modules, spec, overlap, dispatcher(spec.kind).deduplicates_tp))
    return out


def _layouts(
    rules: _Rules, choices: list[_Choice], degrees: tuple[int, int, int, int, int, int, int, int]
) -> Iterator[ParallelConfig]:
    """The layouts of these degrees, one per choice, that break no rule."""
    if not choices:
        return
    tp, cp, pp, vpp, ep, etp, mbs, dp = degrees
    base = ParallelConfig(
        tp=tp,
        pp=pp,
        vpp=vpp,
        cp=cp,
        ep=ep,
        etp=etp,
        dp=dp,
        edp=rules.world // (etp * ep * pp),
        micro_batch=mbs,
        grouped_gemm=grouped_gemm_supported(rules.gpu),
        distributed_optimizer=rules.target.distributed_optimizer,
        dp_sharding=rules.target.dp_sharding,
        optimizer=rules.optimizer,
        fp8_param_gather=rules.fp8_param_gather,
        moe_router_fusion=rules.target.moe_router_fusion,
    )
    if not rules.degrees_free(base):
        return
    for recompute, modules, spec, overlap, deduplicates_tp in choices:
        # Validated fields only (the base, and each choice once): a copy is half the cost of a new model.
        config = base.model_copy(
            update={
                # A dispatcher that removes the TP ranks' duplicate tokens needs them: no sequence parallelism.
                "sequence_parallel": tp > 1 and not deduplicates_tp,
                "recompute": recompute,
                "recompute_modules": modules,
                "dispatcher": spec,
                "a2a_overlap": overlap,
                "delay_wgrad_compute": overlap,  # never slower under the overlap (``costmodel.ep_overlap``)
            }
        )
        if not rules.free(config):
            continue
        variants = [config]
        if rules.cuda_graphs:
            variants.append(config.model_copy(update={"cuda_graphs": rules.cuda_graphs}))
        if rules.tp_comm_overlap and config.sequence_parallel:
            variants += [v.model_copy(update={"tp_comm_overlap": True}) for v in variants]
        yield config
        yield from (v for v in variants[1:] if rules.free(v))
