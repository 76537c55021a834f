"""Exposed EP communication under Megatron's combined 1F1B overlap (``--overlap-moe-expert-parallel-comm``).

Megatron-Core pairs the forward of one micro-batch's layer with the backward of another's and runs each
pair in three phases on a compute and a communication stream (``TransformerLayerSchedulePlan.run``,
``megatron/core/models/common/model_chunk_schedule_plan.py`` at d98e8a64)::

    comm stream: combine_bwd       | dispatch_fwd -> dispatch_bwd   | combine_fwd
    comp stream: pre_dispatch_fwd  | mlp_bwd -> mlp_wgrad -> mlp_fwd | pre_dispatch_bwd -> wgrad

``pre_dispatch`` is everything before the dispatch (norms, attention, router, shared experts, permute),
``mlp`` the routed experts. Each stream runs its kernels in this order; a kernel also waits for its
inputs: the backward's combine for the previous pair's ``pre_dispatch_bwd`` (the gradient it passes
down), the forward's ``pre_dispatch`` for the previous pair's ``combine_fwd`` (the layer below's
output), ``mlp_bwd`` for ``combine_bwd``, ``dispatch_fwd`` for ``pre_dispatch_fwd``, ``dispatch_bwd``
for ``mlp_bwd``, ``mlp_fwd`` for ``dispatch_fwd``, ``combine_fwd`` for ``mlp_fwd`` and
``pre_dispatch_bwd`` for ``dispatch_bwd``. Without ``--delay-wgrad-compute`` the weight gradients run
inside their module's backward (the ``*_wgrad`` slots are empty), so ``dispatch_bwd`` also waits for the
experts' weight gradients.

``exposed_seconds`` runs this schedule over a chain of layers and returns the steady-state time per layer
pair that the compute stream waits on communication: a pair repeats every ``compute + exposed`` seconds.
A model chunk's first and last layer pair are priced as the steady state (the search's per-layer cost is
linear in the layers a rank holds).

Not every pass has a partner: a pipeline rank runs its warm-up forwards and its cool-down backwards alone
(the same ``run`` with no backward or no forward layer). Megatron-Core's interleaved schedule gives rank r
``2 (pp - r - 1) + (vpp - 1) pp + 1`` warm-up passes with the overlap (``get_pp_rank_microbatches``,
``schedules.py`` at d98e8a64: "we schedule one extra micro-batch forward step before the 1f1b stages",
``microbatch_group_size_per_vp_stage`` defaulting to pp) of its ``m vpp`` chunk passes; rank 0, which
runs the step's first forward and last backward, has the most, ``pp vpp + pp - 1``. Without pipelining
the first forward and the last backward run alone (``combined_1f1b_schedule_for_no_pipelining``).
``unpaired_fraction`` is rank 0's share. Alone, a forward waits for each transfer; a backward still runs
its dispatch beside the experts' delayed weight gradients and the next layer's combine beside the
pre-dispatch ones (``backward_dw`` waits on no transfer): ``unpaired_exposed_seconds`` runs the same
schedule with only the forward's, then only the backward's, stages. Megatron runs the
overlap with pp above 1 only interleaved (rule 10); with vpp 1 a plan or validation case stands for
DeepSeek's DualPipe, which feeds its pipeline from both ends and whose unpaired passes are not priced.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["LayerStages", "exposed_seconds", "unpaired_exposed_seconds", "unpaired_fraction"]

_WARM_PAIRS = 16
"""Layer pairs run before the period is measured, and again to measure it: the schedule's dependencies
reach back one pair, so the chain settles within a few."""


@dataclass(frozen=True, slots=True)
class LayerStages:
    """Seconds of one MoE layer's stages for one micro-batch on one rank."""

    pre_dispatch_fwd: float
    pre_dispatch_bwd: float
    """Data gradients (and weight gradients unless delayed) of everything before the dispatch."""
    mlp_fwd: float
    mlp_bwd: float
    pre_dispatch_wgrad: float = 0.0
    """Delayed weight gradients of the pre-dispatch GEMMs (0 unless ``delay_wgrad_compute``)."""
    mlp_wgrad: float = 0.0
    dispatch_fwd: float = 0.0
    combine_fwd: float = 0.0
    dispatch_bwd: float = 0.0
    combine_bwd: float = 0.0

    @property
    def compute(self) -> float:
        return (
            self.pre_dispatch_fwd + self.pre_dispatch_bwd + self.pre_dispatch_wgrad
            + self.mlp_fwd + self.mlp_bwd + self.mlp_wgrad
        )  # fmt: skip


def _compute_waits(s: LayerStages, pairs: int) -> list[float]:
    """Seconds the compute stream waits on communication in each of ``pairs`` layer pairs run back to
    back from an idle start."""
    comp = comm = 0.0  # when each stream is next free
    grad_ready = 0.0  # the previous pair's pre_dispatch_bwd: the gradient the next backward starts from
    input_ready = 0.0  # the previous pair's combine_fwd: the input the next forward starts from
    waits = []
    for _ in range(pairs):
        combine_bwd = max(comm, grad_ready) + s.combine_bwd
        wait = max(0.0, input_ready - comp)
        pre_fwd = comp + wait + s.pre_dispatch_fwd
        dispatch_fwd = max(combine_bwd, pre_fwd) + s.dispatch_fwd
        wait_combine = max(0.0, combine_bwd - pre_fwd)
        mlp_bwd = pre_fwd + wait_combine + s.mlp_bwd
        mlp_wgrad = mlp_bwd + s.mlp_wgrad
        dispatch_bwd = max(dispatch_fwd, mlp_bwd) + s.dispatch_bwd
        wait_dispatch = max(0.0, dispatch_fwd - mlp_wgrad)
        mlp_fwd = mlp_wgrad + wait_dispatch + s.mlp_fwd
        combine_fwd = max(dispatch_bwd, mlp_fwd) + s.combine_fwd
        wait_gradient = max(0.0, dispatch_bwd - mlp_fwd)
        pre_bwd = mlp_fwd + wait_gradient + s.pre_dispatch_bwd
        comp, comm = pre_bwd + s.pre_dispatch_wgrad, combine_fwd
        grad_ready, input_ready = pre_bwd, combine_fwd
        waits.append(wait + wait_combine + wait_dispatch + wait_gradient)
    return waits


def exposed_seconds(stages: LayerStages) -> float:
    """Steady-state seconds per layer pair that the compute stream waits on EP communication: the mean
    wait of the second ``_WARM_PAIRS`` pairs of a chain (exactly 0 where no kernel ever waits)."""
    return sum(_compute_waits(stages, 2 * _WARM_PAIRS)[_WARM_PAIRS:]) / _WARM_PAIRS


def unpaired_exposed_seconds(stages: LayerStages) -> float:
    """Seconds per layer that a forward run alone and a backward run alone wait on EP communication."""
    forward = replace(
        stages,
        pre_dispatch_bwd=0.0,
        pre_dispatch_wgrad=0.0,
        mlp_bwd=0.0,
        mlp_wgrad=0.0,
        dispatch_bwd=0.0,
        combine_bwd=0.0,
    )
    backward = replace(stages, pre_dispatch_fwd=0.0, mlp_fwd=0.0, dispatch_fwd=0.0, combine_fwd=0.0)
    return exposed_seconds(forward) + exposed_seconds(backward)


def unpaired_fraction(pp: int, vpp: int, num_microbatches: int) -> float:
    """Share of pipeline rank 0's forward (and of its backward) passes that run without a partner under EP
    overlap: ``pp * vpp + pp - 1`` warm-up passes of ``m * vpp`` (module docstring), or one of m without
    pipelining; none for DualPipe (pp above 1 with vpp 1, module docstring)."""
    if pp > 1 and vpp == 1:
        return 0.0
    alone = pp * vpp + pp - 1 if pp > 1 else 1
    return min(1.0, alone / (num_microbatches * vpp))
