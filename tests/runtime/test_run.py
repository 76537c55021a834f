"""`moeplan run` on gloo CPU ranks: every dispatcher and layout trains the same model as one process.

The reference is a single rank that runs every micro-batch of the global batch in turn (gradient
accumulation): data parallelism over DP ranks is exactly that computation split up, and expert
parallelism only moves tokens. So with condensation off, the gradients after the first step and the loss
curve must match the reference up to float32 summation order (tolerances below).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from planner.catalog import load_model
from planner.execution.launcher import RankPlacement, local_placement
from planner.runtime.run_options import RunOptions, RunResults
from planner.schema import DispatcherSpec, ParallelConfig
from planner.workflows.run import launch_run

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS = 3
GLOBAL_BATCH = 8
SEQ_LEN = 32
LOSS_RTOL = 2e-4
GRAD_ATOL = 2e-5


def _run(world: int, ranks_per_node: int, tmp: Path, name: str, kind: str = "alltoall", steps: int = STEPS,
         **degrees: int) -> tuple[RunResults, dict[str, torch.Tensor]]:  # fmt: skip
    # "migration": the flat all-to-all with Luffy's sequence migration.
    dispatcher = DispatcherSpec(
        kind="alltoall" if kind == "migration" else kind,  # type: ignore[arg-type]
        num_chunks=2 if kind == "monta" else 1,
        sequence_migration=kind == "migration",
    )
    degrees = {"sequence_parallel": False, **degrees}
    parallel = ParallelConfig.for_world(world, dispatcher=dispatcher, **degrees)
    grads = tmp / f"{name}.pt"
    options = RunOptions(
        model=load_model("tiny-moe"), model_name="tiny-moe", parallel=parallel, backend="gloo", steps=steps,
        seed=7, seq_len=SEQ_LEN, global_batch=GLOBAL_BATCH, ranks_per_node=ranks_per_node, started=time.time(),
        dump_gradients=str(grads),
    )  # fmt: skip
    base = local_placement(world)
    placement = RankPlacement(base.prefixes, base.master_addr, base.interface, ranks_per_node)
    outcome = launch_run(options, placement)
    return outcome.results, torch.load(grads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunResults, dict[str, torch.Tensor]]:
    return _run(1, 1, tmp_path_factory.mktemp("ref"), "reference")


LAYOUTS = [
    ("dp4", "alltoall", {}),
    ("ep2-alltoall", "alltoall", {"ep": 2}),
    ("ep4-alltoall", "alltoall", {"ep": 4}),
    ("ep4-hierarchical", "hierarchical", {"ep": 4}),
    ("tp2-ep2-alltoall", "alltoall", {"tp": 2, "ep": 2}),
    ("tp2-ep2-monta", "monta", {"tp": 2, "ep": 2}),
    ("tp2-sp-ep2-alltoall", "alltoall", {"tp": 2, "ep": 2, "sequence_parallel": True}),
    ("tp2-sp-ep4-hierarchical", "hierarchical", {"tp": 2, "ep": 4, "sequence_parallel": True}),
    ("etp2-ep2-alltoall", "alltoall", {"etp": 2, "ep": 2}),
    ("tp2-sp-etp2-ep2-hierarchical", "hierarchical", {"tp": 2, "etp": 2, "ep": 2, "sequence_parallel": True}),
    ("pp2-1f1b", "alltoall", {"pp": 2}),
    ("pp2-vpp2-ep2", "alltoall", {"pp": 2, "vpp": 2, "ep": 2}),
    ("pp2-vpp2-tp2-sp-ep2", "alltoall", {"pp": 2, "vpp": 2, "tp": 2, "ep": 2, "sequence_parallel": True}),
    ("cp2-ep2-alltoall", "alltoall", {"cp": 2, "ep": 2}),
    ("cp4-ep4-hierarchical", "hierarchical", {"cp": 4, "ep": 4}),
    ("tp2-cp2-ep2-monta", "monta", {"tp": 2, "cp": 2, "ep": 2}),
    ("tp2-sp-cp2-ep4-alltoall", "alltoall", {"tp": 2, "cp": 2, "ep": 4, "sequence_parallel": True}),
    ("pp2-cp2-ep2", "alltoall", {"pp": 2, "cp": 2, "ep": 2}),
    ("ep4-allgather", "allgather", {"ep": 4}),
    ("ep2-allgather", "allgather", {"ep": 2}),  # dp 4, edp 2: two EP groups, each inside a node
    ("tp2-ep2-allgather", "allgather", {"tp": 2, "ep": 2}),  # TP peers gather each other's duplicates
    ("tp2-sp-ep4-allgather", "allgather", {"tp": 2, "ep": 4, "sequence_parallel": True}),
    ("ep4-migration", "migration", {"ep": 4}),
    ("ep2-migration", "migration", {"ep": 2}),
]


@pytest.mark.parametrize(("name", "kind", "degrees"), LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_layout_matches_one_process(
    reference: tuple[RunResults, dict[str, torch.Tensor]], tmp_path: Path, name: str, kind: str,
    degrees: dict[str, int],
) -> None:  # fmt: skip
    ref_results, ref_grads = reference
    results, grads = _run(4, 2, tmp_path, name, kind, **degrees)
    assert set(grads) == set(ref_grads)
    worst = max((grads[k] - ref_grads[k]).abs().max().item() for k in grads)
    assert worst < GRAD_ATOL, f"largest gradient difference {worst:.3g}"
    ours = [r.loss for r in results.steps]
    theirs = [r.loss for r in ref_results.steps]
    assert ours == pytest.approx(theirs, rel=LOSS_RTOL)
    if degrees.get("ep", 1) > 1:
        assert results.bytes_per_link_class["inter_node"] > 0  # 2 pretend nodes of 2 ranks
    if kind == "allgather":  # tokens and their routing gathered, outputs reduce-scattered, both ways
        for collective in ("dispatch", "combine", "dispatch_backward", "combine_backward"):
            assert results.bytes_per_collective[collective] > 0, collective
    if name == "ep4-allgather":  # every rank's micro-batch has SEQ_LEN tokens: the formula, no padding
        spec = load_model("tiny-moe")
        calls = (spec.num_layers - spec.first_k_dense_layers) * GLOBAL_BATCH  # MoE layers x micro-batches
        row = spec.hidden_size * 4  # float32
        others = 3  # every rank sends to the other P - 1 members of its EP group
        assert results.bytes_per_collective["combine"] == calls * others * SEQ_LEN * row
        routing = (spec.moe_router_topk or 0) * (4 + 4)  # int32 expert ids and float32 weights
        assert results.bytes_per_collective["dispatch"] == calls * others * SEQ_LEN * (row + routing)
    if degrees.get("etp", 1) > 1:  # routed rows gathered over ETP, partial outputs reduce-scattered
        for kind in ("etp_all_gather", "etp_reduce_scatter"):
            assert results.bytes_per_collective[kind] == results.bytes_per_collective[f"{kind}_backward"] > 0
    if degrees.get("pp", 1) > 1:  # activations forward, their gradients back, for every micro-batch
        per_rank_chunks = degrees.get("vpp", 1)
        sends = 2 * degrees["pp"] * per_rank_chunks - 2  # every chunk boundary, both directions
        sequence = SEQ_LEN // degrees.get("cp", 1)  # each CP rank sends its part of the sequence
        sequence //= degrees.get("tp", 1) if degrees.get("sequence_parallel") else 1
        hidden = load_model("tiny-moe").hidden_size
        replicas = 4 // degrees["pp"]  # ranks of one stage, each sending its share
        per_micro_batch = sequence * hidden * 4 * replicas
        micro_batches = GLOBAL_BATCH // (4 // degrees["pp"] // degrees.get("tp", 1) // degrees.get("cp", 1))
        assert results.bytes_per_collective["pp_p2p"] == sends * per_micro_batch * micro_batches
    if degrees.get("cp", 1) > 1:  # keys and values gathered forward and again backward; gradients scattered
        gathered, scattered = (
            results.bytes_per_collective[f"cp_kv_{k}"] for k in ("all_gather", "reduce_scatter")
        )
        if degrees.get("pp", 1) == 1:
            assert gathered == 2 * scattered > 0
        else:  # the pipeline's first step also runs a forward for shape inference: gathers, no backward
            assert gathered > 2 * scattered > 0
    if kind == "migration":  # sequences moved: their partial sums travelled, and the report says how many
        assert results.bytes_per_collective["migration"] > 0
        assert results.migrated_fraction is not None and 0 < results.migrated_fraction < 1
    if degrees.get("sequence_parallel"):  # tokens gathered into each block, reduce-scattered out of it
        assert results.bytes_per_collective["sp_all_gather"] > 0
        assert results.bytes_per_collective["sp_reduce_scatter"] > 0
    elif degrees.get("tp", 1) > 1:  # the dense layers are split: their outputs are all-reduced over TP
        assert results.bytes_per_collective["tp_all_reduce"] > 0


def test_loss_falls_under_expert_parallelism(tmp_path: Path) -> None:
    results, _ = _run(4, 2, tmp_path, "long", "hierarchical", steps=30, ep=4)
    losses = [r.loss for r in results.steps]
    assert losses[-1] < 0.75 * losses[0], losses
