"""Megatron's combined 1F1B EP overlap: the exposed communication its schedule leaves per layer pair."""

from __future__ import annotations

import pytest

from planner.costmodel.ep_overlap import LayerStages, exposed_seconds


def _stages(**seconds: float) -> LayerStages:
    fields = dict.fromkeys(LayerStages.__dataclass_fields__, 0.0)
    fields.update(seconds)
    return LayerStages(**fields)


COMPUTE = {"pre_dispatch_fwd": 1.0, "mlp_bwd": 1.0, "mlp_fwd": 1.0, "pre_dispatch_bwd": 1.0}


def test_no_communication_exposes_nothing() -> None:
    assert exposed_seconds(_stages(**COMPUTE)) == 0.0


def test_communication_that_fits_beside_its_phase_is_hidden() -> None:
    # Each transfer is no longer than the compute of its phase: the compute stream never waits.
    even = _stages(**COMPUTE, combine_bwd=1.0, dispatch_fwd=0.5, dispatch_bwd=0.5, combine_fwd=1.0)
    assert exposed_seconds(even) == pytest.approx(0.0)


def test_a_long_backward_combine_shows_although_the_pair_has_more_compute() -> None:
    # 2 s of communication beside 4 s of compute, all of it the backward's combine: the old rule
    # max(0, comm - compute) hid it all, but the experts' backward waits for the combine, which waits
    # for the previous pair's last kernel, so each pair runs combine (2) + mlp_bwd + mlp_fwd +
    # pre_dispatch_bwd (3) = 5 s with pre_dispatch_fwd under the combine: 1 s shows.
    assert exposed_seconds(_stages(**COMPUTE, combine_bwd=2.0)) == pytest.approx(1.0)


def test_communication_alone_sets_the_period() -> None:
    # With no compute the pair takes its four transfers back to back.
    comm_only = _stages(combine_bwd=1.0, dispatch_fwd=2.0, dispatch_bwd=3.0, combine_fwd=4.0)
    assert exposed_seconds(comm_only) == pytest.approx(10.0)


def test_delaying_the_experts_weight_gradients_hides_the_backward_dispatch() -> None:
    # The backward dispatch waits for the experts' backward; with their weight gradients delayed
    # (--delay-wgrad-compute) it waits for the data gradients only and runs beside the weight gradients.
    comm = {"combine_bwd": 1.0, "dispatch_fwd": 1.0, "dispatch_bwd": 2.0, "combine_fwd": 1.0}
    inline = _stages(pre_dispatch_fwd=1.0, mlp_bwd=2.0, mlp_fwd=1.0, pre_dispatch_bwd=1.0, **comm)
    delayed = _stages(
        pre_dispatch_fwd=1.0, mlp_bwd=1.0, mlp_wgrad=1.0, mlp_fwd=1.0, pre_dispatch_bwd=1.0, **comm
    )
    assert inline.compute == delayed.compute
    assert exposed_seconds(delayed) < exposed_seconds(inline)
