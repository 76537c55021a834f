"""Megatron's combined 1F1B EP overlap: the exposed communication its schedule leaves per layer pair."""

from __future__ import annotations

import pytest

from planner.catalog import load_cluster, load_model
from planner.costmodel.ep_overlap import (
    LayerStages,
    exposed_seconds,
    unpaired_exposed_seconds,
    unpaired_fraction,
)
from planner.costmodel.estimate import LayerCache, layer_seconds, layout_costs
from planner.schema import ParallelConfig, TrainingSpec


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


def test_unpaired_passes_follow_megatrons_warm_up_counts() -> None:
    # Interleaved: rank r warms up with 2 (pp - r - 1) + (vpp - 1) pp + 1 passes; rank 0 has the most.
    pp, vpp, m = 4, 2, 16
    assert unpaired_fraction(pp, vpp, m) == pytest.approx((2 * (pp - 1) + (vpp - 1) * pp + 1) / (m * vpp))
    assert unpaired_fraction(1, 1, 8) == pytest.approx(1 / 8)  # the first forward, the last backward
    assert unpaired_fraction(8, 4, 2) == 1.0  # every pass is a warm-up pass
    assert unpaired_fraction(16, 1, 64) == 0.0  # DualPipe: not priced


def test_alone_a_forward_waits_for_every_transfer_and_a_backward_hides_behind_its_weight_gradients() -> None:
    comm = {"combine_bwd": 1.0, "dispatch_fwd": 1.0, "dispatch_bwd": 1.0, "combine_fwd": 1.0}
    delayed = _stages(**COMPUTE, mlp_wgrad=1.0, pre_dispatch_wgrad=1.0, **comm)
    # Forward: dispatch and combine in line (2 s); backward: its dispatch beside the experts' weight
    # gradients and the next combine beside the pre-dispatch ones (0 s).
    assert unpaired_exposed_seconds(delayed) == pytest.approx(2.0)
    inline = _stages(**COMPUTE, **comm)
    assert unpaired_exposed_seconds(inline) == pytest.approx(4.0)  # without delay nothing hides


def test_a_layout_weighs_its_unpaired_passes_in_and_the_search_bound_agrees() -> None:
    model, cluster = load_model("mixtral-8x7b"), load_cluster("dgx-h100")
    training = TrainingSpec(seq_len=4096, global_batch=64)
    p = ParallelConfig.for_world(32, tp=2, pp=2, vpp=2, ep=4, a2a_overlap=True)
    cache = LayerCache()
    costs = layout_costs(model, training, p, cluster, cache)
    key = next(iter(cache.layers))
    paired, alone = cache.layers[key][1], cache.alone[key]
    share = unpaired_fraction(p.pp, p.vpp, costs.num_microbatches)
    assert 0 < share < 1
    assert alone.items["ep_dispatch_combine"][1] > paired.items["ep_dispatch_combine"][1]
    assert "ep_overlap_sm_cost" not in alone.items  # no other pass's compute beside it
    for name, (total, exposed) in costs.moe.items.items():
        for i, value in ((0, total), (1, exposed)):
            ends = [terms.items.get(name, [0.0, 0.0])[i] for terms in (paired, alone)]
            assert value == pytest.approx((1 - share) * ends[0] + share * ends[1])
    assert layer_seconds(model, training, p, cluster, cache)[1] == costs.moe_s
