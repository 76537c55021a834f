"""The all-gather dispatcher against the one-process reference, and its bytes against its docstring.

One gloo world of 4 ranks on 2 pretend nodes (``ranks_per_node`` 2), float64 throughout, uneven token
counts per rank (one rank with none). Cases: one EP group of every rank (built through the registry, as
the run loop builds it) and two EP groups of 2 (each rank's EP peer on its node, with an expert
data-parallel replica of every expert on the other node). Every expert is ``tanh(x @ W_e)`` with ``W_e``
from one global [E, H, H] tensor, so the reference holds all experts and each rank its member's slice.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from planner.runtime.dispatchers import DispatcherSetup, dispatcher_factory
from planner.runtime.dispatchers._local import LocalDispatcher
from planner.runtime.dispatchers.allgather import AllGatherDispatcher
from planner.runtime.meter import INTRA_NODE, TrafficMeter, link_class
from planner.schema import DispatcherSpec, ParallelConfig
from tests.runtime.test_dispatch import Experts, _free_port

pytestmark = pytest.mark.dist

WORLD, RANKS_PER_NODE = 4, 2
HIDDEN, TOP_K, EXPERTS_PER_MEMBER = 16, 2, 2
TOKENS = {"ep4": [7, 12, 3, 10], "ep2": [5, 0, 9, 4]}
"""Tokens per rank of each case: uneven, and rank 1 of ``ep2`` has none."""
ELEMENT = WEIGHT = 8  # float64 tokens and combine weights
EXPERT_ID = 4  # the ids travel as int32
TOL = {"atol": 1e-12, "rtol": 1e-12}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    ep: int

    def ep_groups(self) -> list[list[int]]:
        return [list(range(i, i + self.ep)) for i in range(0, WORLD, self.ep)]

    def ep_group_of(self, rank: int) -> list[int]:
        return next(g for g in self.ep_groups() if rank in g)

    @property
    def num_experts(self) -> int:
        return EXPERTS_PER_MEMBER * self.ep


CASES = (Case("ep4", 4), Case("ep2", 2))


def expert_weights(num_experts: int) -> Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(num_experts, HIDDEN, HIDDEN, generator=g, dtype=torch.float64) / math.sqrt(HIDDEN)


def rank_data(case: Case, rank: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Tokens [T, H], expert ids [T, K] (distinct per token), weights [T, K], loss target [T, H]."""
    g = torch.Generator().manual_seed(100 + rank)
    t = TOKENS[case.name][rank]
    tokens = torch.randn(t, HIDDEN, generator=g, dtype=torch.float64)
    ids = torch.rand(t, case.num_experts, generator=g).topk(TOP_K, dim=1).indices
    weights = torch.softmax(torch.randn(t, TOP_K, generator=g, dtype=torch.float64), dim=1)
    target = torch.randn(t, HIDDEN, generator=g, dtype=torch.float64)
    return tokens, ids, weights, target


# ---------------------------------------------------------------------------------------------------
# Workers


def _run_case(case: Case, meter: TrafficMeter) -> dict[str, Any]:
    rank = dist.get_rank()
    mine = None
    for ranks in case.ep_groups():  # collective: every rank creates every group, in the same order
        group = dist.new_group(ranks)
        mine = group if rank in ranks else mine
    assert mine is not None
    parallel = ParallelConfig.for_world(WORLD, ep=case.ep, dispatcher=DispatcherSpec(kind="allgather"))
    setup = DispatcherSetup(
        parallel=parallel, num_experts=case.num_experts, ranks_per_node=RANKS_PER_NODE, groups={"ep": mine},
        ep_groups=case.ep_groups(), meter=meter,
    )  # fmt: skip
    dispatcher = dispatcher_factory(setup)(0)
    assert isinstance(dispatcher, AllGatherDispatcher)
    member = case.ep_group_of(rank).index(rank)
    local = slice(member * EXPERTS_PER_MEMBER, (member + 1) * EXPERTS_PER_MEMBER)
    experts = Experts(expert_weights(case.num_experts)[local])
    tokens, ids, weights, target = rank_data(case, rank)
    tokens.requires_grad_(True)
    weights.requires_grad_(True)
    out = dispatcher(tokens, ids, weights, experts)
    forward = meter.snapshot()
    (out * target).sum().backward()
    assert tokens.grad is not None and weights.grad is not None and experts.weight.grad is not None
    return {
        "out": out.detach(),
        "tokens_grad": tokens.grad,
        "weights_grad": weights.grad,
        "expert_grad": experts.weight.grad,
        "experts": list(range(local.start, local.stop)),
        "forward": forward,
        "traffic": meter.snapshot(),
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    warnings.simplefilter("error")  # the parent's filterwarnings=error does not reach spawned ranks
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=dt.timedelta(seconds=60))
    try:
        results = {case.name: _run_case(case, TrafficMeter(rank, RANKS_PER_NODE)) for case in CASES}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, Any]]]:
    out_dir = tmp_path_factory.mktemp("allgather")
    mp.get_context("forkserver").set_forkserver_preload([__name__])
    mp.start_processes(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, start_method="forkserver")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


# ---------------------------------------------------------------------------------------------------
# Tests


def _kind(snapshot: Any, kind: str) -> tuple[int, int]:
    counts = snapshot["kinds"].get(kind, {"intra_node": 0, "inter_node": 0})
    return counts["intra_node"], counts["inter_node"]


def _split(rank: int, bytes_to: dict[int, int]) -> tuple[int, int]:
    """(intra_node, inter_node) of the bytes ``rank`` sends to each other rank."""
    intra = sum(
        n for r, n in bytes_to.items() if r != rank and link_class(rank, r, RANKS_PER_NODE) == INTRA_NODE
    )
    return intra, sum(n for r, n in bytes_to.items() if r != rank) - intra


def expected_bytes(case: Case, rank: int) -> dict[str, tuple[int, int]]:
    """The module docstring's formulas: what ``rank`` sends per forward call and in the backward."""
    members = case.ep_group_of(rank)
    counts = {r: TOKENS[case.name][r] for r in members}
    t_max = max(counts.values())
    return {
        "counts": _split(rank, dict.fromkeys(members, 8)),
        "dispatch": _split(rank, dict.fromkeys(members, t_max * (HIDDEN * ELEMENT + TOP_K * (EXPERT_ID + WEIGHT)))),
        "combine": _split(rank, {r: t * HIDDEN * ELEMENT for r, t in counts.items()}),
        "combine_backward": _split(rank, dict.fromkeys(members, t_max * HIDDEN * ELEMENT)),
        "dispatch_backward": _split(rank, {r: t * (HIDDEN * ELEMENT + TOP_K * WEIGHT) for r, t in counts.items()}),
    }  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_allgather_matches_the_local_reference(ranks: list[dict[str, dict[str, Any]]], case: Case) -> None:
    full = Experts(expert_weights(case.num_experts))
    for rank, results in enumerate(ranks):
        tokens, ids, weights, target = rank_data(case, rank)
        tokens.requires_grad_(True)
        weights.requires_grad_(True)
        out = LocalDispatcher(case.num_experts)(tokens, ids, weights, full)
        (out * target).sum().backward()
        got = results[case.name]
        torch.testing.assert_close(got["out"], out.detach(), **TOL)
        torch.testing.assert_close(got["tokens_grad"], tokens.grad, **TOL)
        torch.testing.assert_close(got["weights_grad"], weights.grad, **TOL)
    # Every expert's gradient summed over its replicas (one per EP group) equals the reference's, which
    # sums over every rank's tokens.
    assert full.weight.grad is not None
    summed = torch.zeros_like(full.weight.grad)
    for results in ranks:
        summed[results[case.name]["experts"]] += results[case.name]["expert_grad"]
    torch.testing.assert_close(summed, full.weight.grad, **TOL)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_allgather_bytes_are_the_docstring_formula(
    ranks: list[dict[str, dict[str, Any]]], case: Case
) -> None:
    for rank, results in enumerate(ranks):
        expected = expected_bytes(case, rank)
        forward, total = results[case.name]["forward"], results[case.name]["traffic"]
        assert set(forward["kinds"]) == {"counts", "dispatch", "combine"}
        for kind in ("counts", "dispatch", "combine"):
            assert _kind(forward, kind) == expected[kind], (rank, kind)
        for kind in ("dispatch_backward", "combine_backward"):
            assert _kind(total, kind) == expected[kind], (rank, kind)
        # Tokens, expert ids and weights: three all-gathers; one reduce-scatter each way.
        assert forward["kinds"]["dispatch"]["calls"] == 3 and forward["kinds"]["combine"]["calls"] == 1
    if case.name == "ep4":  # rank 2 (3 tokens) pads to the group's 12 for every peer: 1 on its node, 2 off
        row = HIDDEN * ELEMENT + TOP_K * (EXPERT_ID + WEIGHT)
        assert _kind(ranks[2]["ep4"]["forward"], "dispatch") == (12 * row, 2 * 12 * row)
    else:  # EP groups inside a node: nothing crosses the inter-node link
        assert all(results["ep2"]["traffic"]["inter_node"] == 0 for results in ranks)
