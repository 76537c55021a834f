"""The stage-assignment ILP: for one layout, how many dense and MoE layers each pipeline chunk holds.

Given a layout's ``LayoutCosts`` (per-layer seconds t_d, t_m; head h and p2p seconds; memory
coefficients; data-parallel terms ``max(0, total_k - slope_k * T)``), with L layers of which the first
K are dense, C = pp * vpp chunks, chunk c on rank ``c mod pp``:

    minimise   m * T + (pp - 1) * U + sum_k x_k + y
    subject to
      sum_c d_c = K,  sum_c e_c = L - K,  d_c + e_c >= 1                 -> add_layer_counts()
      e_c <= (L - K) z_c,  d_{c+1} <= K (1 - z_c),  z_c <= z_{c+1}         -> add_dense_first()
      T >= t_d sum_{c on r} d_c + t_m sum_{c on r} e_c + p2p [+ h on the last rank]   -> add_rank_time()
      U >= t_d d_c + t_m e_c + p2p / vpp [+ h on the last chunk]             -> add_chunk_time()
      mem_r(d, e) <= HBM capacity, host_r(d, e) <= host share for every rank r -> add_memory_and_optimizer()
      x_k >= total_k - slope_k T,  x_k >= 0                                 -> add_data_parallel()
      e_c >= e_{c+pp} for chunks c >= K on each rank (all-MoE chunks)         -> add_symmetry_breaking()
      y >= optimizer seconds of rank r (GPU and host share) for every r      -> add_memory_and_optimizer()
    d_c, e_c integer >= 0, z_c binary.

m is the number of micro-batches; the pipeline fills and drains one chunk at a time, so the bubble is
(pp - 1) times the largest chunk's time U. The objective is exactly
``evaluate(costs, ranks).step_time_s``: the same coefficients, the same maxima (tests compare the ILP
with exhaustive enumeration of the same space). T and U start at ``bounds.time_floors`` (integral
floors every assignment meets), which closes most of the LP relaxation's gap.

Canonical split (``canonical_stages``): the same model plus

      objective <= optimum * (1 + TIE_TOLERANCE)                              -> canonical_stages()
      maximise sizes d_c + e_c in chunk order, a block at a time, fixing each

gives the lexicographically largest split among the ties, whichever the solver found first.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulp

from planner.costmodel.estimate import LayoutCosts
from planner.costmodel.optimizer import host_capacity_per_gpu
from planner.search.bounds import TIE_TOLERANCE, rank_bytes, time_floors
from planner.search.solver import SolveResult, solve_problem
from planner.units import GIB

__all__ = ["SOLVER_SLACK_S", "StageAssignment", "canonical_stages", "solve_stages"]

SOLVER_SLACK_S = 1e-7
"""Seconds of step time within the solvers' primal feasibility tolerance (HiGHS's default 1e-7)."""
LEX_BLOCK_WEIGHT_LIMIT = 1e5
"""Largest weight of one follow-up objective: chunk sizes times weights must stay exact under the
solver's integrality tolerance (1e-6 x 1e5 is far below the one layer a size moves by)."""


@dataclass(frozen=True, slots=True)
class StageAssignment:
    """The ILP's answer for one layout."""

    result: SolveResult
    layers_per_chunk: tuple[int, ...]


class _StageProblem:
    def __init__(self, costs: LayoutCosts) -> None:
        ctx = costs.context
        self.costs = costs
        self.model = ctx.model
        self.pp, self.vpp = ctx.parallel.pp, ctx.parallel.vpp
        self.chunks = self.pp * self.vpp
        self.num_dense = self.model.num_dense_layers
        self.num_moe = self.model.num_moe_layers
        self.capacity = ctx.cluster.gpu.hbm_gib * GIB
        self.problem = pulp.LpProblem("stage_assignment", pulp.LpMinimize)
        chunk = range(self.chunks)
        add = self.problem.add_variable  # PuLP 4 spelling; constructing LpVariable directly is deprecated
        self.d = [add(f"dense_{c}", lowBound=0, upBound=self.num_dense, cat="Integer") for c in chunk]
        self.e = [add(f"moe_{c}", lowBound=0, upBound=self.num_moe, cat="Integer") for c in chunk]
        self.z = [add(f"moe_started_{c}", cat="Binary") for c in chunk]
        # The integral floors of bounds.time_floors hold for every assignment: as bounds on T and U they
        # close most of the gap between the LP relaxation and the integer optimum before any branching.
        t_floor, u_floor = time_floors(costs)
        self.t = add("rank_seconds", lowBound=t_floor)
        self.u = add("chunk_seconds", lowBound=u_floor)

    def on_rank(self, rank: int) -> list[int]:
        return [c for c in range(self.chunks) if c % self.pp == rank]

    def add_layer_counts(self) -> None:
        self.problem += pulp.lpSum(self.d) == self.num_dense
        self.problem += pulp.lpSum(self.e) == self.num_moe
        for c in range(self.chunks):
            self.problem += self.d[c] + self.e[c] >= 1

    def add_dense_first(self) -> None:
        for c in range(self.chunks):
            self.problem += self.e[c] <= self.num_moe * self.z[c]
            if c + 1 < self.chunks:
                self.problem += self.d[c + 1] <= self.num_dense * (1 - self.z[c])
                self.problem += self.z[c] <= self.z[c + 1]

    def add_rank_time(self) -> None:
        costs = self.costs
        for rank in range(self.pp):
            cs = self.on_rank(rank)
            fixed = costs.p2p_s + (costs.head_s if rank == self.pp - 1 else 0.0)
            dense = pulp.lpSum(self.d[c] for c in cs)
            moe = pulp.lpSum(self.e[c] for c in cs)
            self.problem += self.t >= costs.dense_s * dense + costs.moe_s * moe + fixed

    def add_symmetry_breaking(self) -> None:
        """Order each rank's single-kind chunks by size, largest first (not the model's last chunk, which
        holds the output layer).

        Every chunk holds at least one layer, so chunks from index K (the number of dense layers) on hold
        MoE layers only, and chunks up to C - 1 - (L - K) dense layers only (the chunks after them hold
        at least L - K layers). Among chunks of one kind, a chunk's place within its rank changes nothing
        the objective or the memory rule sees (rank totals, the largest chunk, the last chunk), so this
        keeps one of the equivalent assignments and spares the solver from branching over their
        permutations. Largest first keeps the lexicographically largest assignment, the canonical one.
        """
        last = self.chunks - 1
        all_dense = self.chunks - 1 - self.num_moe
        for c in range(self.chunks):
            nxt = c + self.pp
            if nxt >= last:
                break
            if c >= self.num_dense:
                self.problem += self.e[c] >= self.e[nxt]
            elif nxt <= all_dense:
                self.problem += self.d[c] >= self.d[nxt]

    def add_chunk_time(self) -> None:
        costs = self.costs
        for c in range(self.chunks):
            fixed = costs.p2p_s / self.vpp + (costs.head_s if c == self.chunks - 1 else 0.0)
            self.problem += self.u >= costs.dense_s * self.d[c] + costs.moe_s * self.e[c] + fixed

    def _memory(
        self, rank: int
    ) -> tuple[pulp.LpAffineExpression, pulp.LpAffineExpression, pulp.LpAffineExpression]:
        """(total GPU bytes, GPU optimizer bytes, host optimizer bytes) of a rank as affine expressions of
        the layer counts."""
        mem = self.costs.memory
        dense_bytes, moe_bytes, fixed = rank_bytes(mem, rank)
        optimizer_fixed = 0.0
        if rank == 0:
            optimizer_fixed += mem.first_rank_state[2]
        if rank == self.pp - 1:
            optimizer_fixed += mem.last_rank_state[2]
        cs = self.on_rank(rank)
        dense = pulp.lpSum(self.d[c] for c in cs)
        moe = pulp.lpSum(self.e[c] for c in cs)
        total = dense_bytes * dense + moe_bytes * moe + fixed
        optimizer = mem.dense_layer_state[2] * dense + mem.moe_layer_state[2] * moe + optimizer_fixed
        host = mem.host_per_layer[0] * dense + mem.host_per_layer[1] * moe + mem.host_bytes(rank, 0, 0)
        return total, optimizer, host

    def add_memory_and_optimizer(self) -> pulp.LpVariable:
        # Rows in GiB, not bytes: coefficients near 1e10 next to times near 1e-2 make HiGHS's
        # tolerances loose enough to leave the optimizer term visibly slack.
        y = self.problem.add_variable("optimizer_seconds", lowBound=0)
        rates = self.costs.optimizer_rates
        offloads = self.costs.context.parallel.optimizer.offloads
        host_capacity = host_capacity_per_gpu(self.costs.context.cluster) if offloads else 0.0
        for rank in range(self.pp):
            total, optimizer, host = self._memory(rank)
            self.problem += (1.0 / GIB) * total <= self.capacity / GIB
            seconds = rates.per_gpu_byte * GIB * ((1.0 / GIB) * optimizer)
            if offloads:
                self.problem += (1.0 / GIB) * host <= host_capacity / GIB
                seconds += rates.per_host_byte * GIB * ((1.0 / GIB) * host)
            self.problem += y >= seconds
        return y

    def add_data_parallel(self) -> list[pulp.LpVariable]:
        exposed = []
        for k, term in enumerate(self.costs.data_parallel):
            x = self.problem.add_variable(f"dp_exposed_{k}", lowBound=0)
            self.problem += x >= term.total_s - term.slope * self.t
            exposed.append(x)
        return exposed

    def build(self, symmetry_breaking: bool = True) -> pulp.LpAffineExpression:
        """Every constraint family and the step-time objective, which is also returned."""
        self.add_layer_counts()
        self.add_dense_first()
        self.add_rank_time()
        self.add_chunk_time()
        if symmetry_breaking:
            self.add_symmetry_breaking()
        y = self.add_memory_and_optimizer()
        exposed = self.add_data_parallel()
        step = self.costs.num_microbatches * self.t + self.costs.bubble * self.u + pulp.lpSum(exposed) + y
        self.problem += step
        return step

    def size(self, chunk: int) -> pulp.LpAffineExpression:
        return self.d[chunk] + self.e[chunk]

    def sizes(self) -> tuple[int, ...]:
        return tuple(round(pulp.value(d)) + round(pulp.value(e)) for d, e in zip(self.d, self.e, strict=True))


def solve_stages(costs: LayoutCosts, time_limit_s: float, gap: float) -> StageAssignment:
    """The optimal stage assignment of one layout (or an infeasible result when no assignment fits)."""
    stage = _StageProblem(costs)
    if stage.chunks > stage.model.num_layers:
        return StageAssignment(SolveResult("infeasible", False, None), ())
    stage.build()
    result = solve_problem(stage.problem, time_limit_s, gap)
    if result.objective is None:
        return StageAssignment(result, ())
    # Chunk sizes only: evaluate() rebuilds each chunk's dense/MoE split (dense layers first) from them.
    return StageAssignment(result, stage.sizes())


def canonical_stages(
    costs: LayoutCosts, optimum_s: float, sizes: tuple[int, ...], time_limit_s: float
) -> tuple[int, ...] | None:
    """The lexicographically largest chunk sizes among the assignments within ``TIE_TOLERANCE`` of
    ``optimum_s``, or None when no assignment is that fast (``optimum_s`` was not an optimum) or the
    solver did not prove a step within ``time_limit_s``.

    Follow-up ILPs on the same model with the step time capped at ``optimum_s * (1 + TIE_TOLERANCE)``:
    each maximises the next block of chunk sizes (weights (L + 1)^k make a weighted sum order blocks
    lexicographically, exactly, for sizes up to L - C + 1) and fixes them. ``sizes``, one assignment in
    the set, skips the work where it is forced: a block is solved only while some chunk after the
    fixed ones could hold more layers. The symmetry breaking keeps the lexicographically largest
    assignment (largest chunk first within a rank), so the capped model still contains it.
    """
    stage = _StageProblem(costs)
    chunks, layers = stage.chunks, stage.model.num_layers
    if chunks == 1 or chunks == layers:
        return sizes  # one assignment only
    step = stage.build()
    # The cap in the model's own arithmetic (its memory rows in GiB, its solver tolerances): the step
    # time it gives ``sizes``, if that is above ``optimum_s``.
    pinned = _StageProblem(costs)
    pinned.build(symmetry_breaking=False)  # ``sizes`` may be any of the equivalent orders
    for c, size in enumerate(sizes):
        pinned.problem += pinned.size(c) == size
    given = solve_problem(pinned.problem, time_limit_s, 0.0)
    if given.objective is None:
        return None
    # Plus the solvers' primal feasibility tolerance (1e-7), which the model's own answers carry.
    stage.problem += step <= max(optimum_s, given.objective) * (1 + TIE_TOLERANCE) + SOLVER_SLACK_S
    weight = layers - chunks + 2
    block = 1
    while weight ** (block + 1) <= LEX_BLOCK_WEIGHT_LIMIT:
        block += 1
    current = list(sizes)
    c = 0
    while c < chunks - 1:
        # Forced: every later chunk at one layer (current[c] is then the most chunk c can hold).
        if current[c] == layers - sum(current[:c]) - (chunks - 1 - c):
            stage.problem += stage.size(c) == current[c]
            c += 1
            continue
        members = range(c, min(c + block, chunks - 1))
        # The problem minimises: the largest block is the least negated weighted sum.
        stage.problem.setObjective(
            pulp.lpSum(-(weight ** (members[-1] - k)) * stage.size(k) for k in members)
        )
        result = solve_problem(stage.problem, time_limit_s, 0.0)
        if result.status == "infeasible":
            # It cannot be: the previous answer is still a solution. HiGHS 1.15.1's presolve says so on
            # DeepSeek-V3 at pp 4, vpp 8 (the same model solves to optimal without presolve).
            result = solve_problem(stage.problem, time_limit_s, 0.0, presolve=False)
        if not result.optimal:
            return None
        current = list(stage.sizes())
        for k in members:
            stage.problem += stage.size(k) == current[k]
        c = members[-1] + 1
    return tuple(current)
