"""Token dispatchers against the single-process reference, and their byte counts against the formulas.

Distributed tests spawn one gloo world per size (2, 4, 8 ranks, ``ranks_per_node`` 2 unless a case says
otherwise), run every case on every rank in the same order (``new_group`` is collective) and save each
rank's output, gradients and traffic snapshot; the parent recomputes everything with
:class:`LocalDispatcher` over the same data and compares (float32, atol = rtol = 1e-5).

Data units: without TP every rank has its own tokens (unit = rank); with TP the t peers of a TP group
share them (unit = rank // t). Every expert is a tanh-linear layer ``tanh(x @ W_e)`` with ``W_e`` from
one global [E, H, H] tensor, so the reference holds all experts and each rank the slice of its EP
member. Some tokens are near-duplicates of others (same experts, 1e-3 noise) so that condensation has
something to condense.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import socket
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from planner.runtime.dispatchers._condensing import Condensing
from planner.runtime.dispatchers._local import LocalDispatcher
from planner.runtime.dispatchers._routing import capacity_keep_mask
from planner.runtime.dispatchers.alltoall import AllToAllDispatcher
from planner.runtime.dispatchers.hierarchical import HierarchicalDispatcher, hierarchical_groups
from planner.runtime.dispatchers.monta import MoNTADispatcher
from planner.runtime.meter import INTRA_NODE, TrafficMeter, link_class, node_of
from planner.runtime.protocols import ExpertFn, TokenDispatcher

TOKENS = 12
HIDDEN = 64
TOP_K = 2
EXPERTS_PER_RANK = 2
DUPLICATES = 4
"""The last DUPLICATES tokens are near-copies of the first DUPLICATES (same experts)."""
ELEMENT = 4  # float32
META = TOP_K * (4 + 4)  # hierarchical metadata per copy: K int32 slot ids + K float32 weights
TOL = {"atol": 1e-5, "rtol": 1e-5}
WORLDS = (2, 4, 8)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny ops: on 2 loaded cores intra-op threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------
# Shared by the workers and the reference


class Experts(nn.Module):
    """``count`` tanh-linear experts; rows grouped by expert as the ExpertFn protocol says."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def forward(self, tokens: Tensor, counts: Sequence[int]) -> Tensor:
        parts = tokens.split(list(counts))
        return torch.cat([torch.tanh(part @ self.weight[i]) for i, part in enumerate(parts)])


def expert_weights(num_experts: int) -> Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(num_experts, HIDDEN, HIDDEN, generator=g) / math.sqrt(HIDDEN)


def unit_data(unit: int, num_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Tokens [T, H], expert ids [T, K] (distinct per token), weights [T, K], loss target [T, H]."""
    g = torch.Generator().manual_seed(100 + unit)
    tokens = torch.randn(TOKENS, HIDDEN, generator=g)
    ids = torch.rand(TOKENS, num_experts, generator=g).topk(TOP_K, dim=1).indices
    weights = torch.softmax(torch.randn(TOKENS, TOP_K, generator=g), dim=1)
    target = torch.randn(TOKENS, HIDDEN, generator=g)
    d = DUPLICATES
    tokens[-d:] = tokens[:d] + 1e-3 * torch.randn(d, HIDDEN, generator=g)
    ids[-d:] = ids[:d]
    return tokens, ids, weights, target


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    kind: str
    """a2a | hier | monta"""
    ranks_per_node: int = 2
    capacity_factor: float | None = None
    threshold: float | None = None
    """Wrap in Condensing with this threshold."""
    tp: int = 1
    ep_contiguous: bool = False
    """MoNTA/TP cases: EP groups of contiguous ranks (Megatron's expert grid, ETP 1) instead of the ranks
    with the same TP rank."""
    num_chunks: int = 2

    def experts(self, world: int) -> int:
        return EXPERTS_PER_RANK * world // self.tp if self.tp > 1 else EXPERTS_PER_RANK * world

    def ep_groups(self, world: int) -> list[list[int]]:
        if self.tp == 1:
            return [list(range(world))]
        if self.ep_contiguous:
            ep = world // self.tp
            return [list(range(i, i + ep)) for i in range(0, world, ep)]
        return [list(range(r, world, self.tp)) for r in range(self.tp)]

    def tp_groups(self, world: int) -> list[list[int]]:
        return [list(range(i, i + self.tp)) for i in range(0, world, self.tp)]

    def unit(self, rank: int) -> int:
        return rank // self.tp


def cases(world: int) -> list[Case]:
    out = [
        Case("a2a", "a2a"),
        Case("a2a_capacity", "a2a", capacity_factor=1.0),
        Case("hier", "hier"),
        Case("hier_one_per_node", "hier", ranks_per_node=1),
        Case("a2a_one_per_node", "a2a", ranks_per_node=1),
        Case("cond_off", "a2a", threshold=1.5),
        Case("cond_a2a", "a2a", threshold=0.99),
        Case("cond_hier", "hier", threshold=0.99),
    ]
    if world >= 4:
        out += [
            Case("monta", "monta", tp=2),
            Case("a2a_tp_duplicated", "a2a", tp=2),
        ]
    if world >= 8:
        out.append(Case("monta_contiguous_ep", "monta", tp=2, ep_contiguous=True, num_chunks=3))
    return out


# ---------------------------------------------------------------------------------------------------
# Workers


def _new_groups(groups: list[list[int]]) -> dist.ProcessGroup:
    """Create every group (collective: all ranks, same order); return the caller's."""
    mine = None
    for ranks in groups:
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    assert mine is not None
    return mine


def _build(case: Case, world: int, meter: TrafficMeter) -> tuple[TokenDispatcher, list[int]]:
    """The case's dispatcher and this rank's EP group."""
    rank = dist.get_rank()
    num_experts = case.experts(world)
    ep_groups = case.ep_groups(world)
    ep_ranks = next(g for g in ep_groups if rank in g)
    dispatcher: TokenDispatcher
    if case.kind == "hier":
        groups = hierarchical_groups(ep_groups, case.ranks_per_node)
        assert groups is not None
        dispatcher = HierarchicalDispatcher(groups, num_experts, meter=meter)
    elif case.kind == "monta":
        tp = _new_groups(case.tp_groups(world))
        ep = _new_groups(ep_groups)
        dispatcher = MoNTADispatcher(ep, tp, num_experts, num_chunks=case.num_chunks, meter=meter)
    else:
        ep = dist.group.WORLD if len(ep_groups) == 1 else _new_groups(ep_groups)
        assert ep is not None
        dispatcher = AllToAllDispatcher(ep, num_experts, meter=meter, capacity_factor=case.capacity_factor)
    if case.threshold is not None:
        dispatcher = Condensing(dispatcher, case.threshold)
    return dispatcher, ep_ranks


def _run_case(case: Case, world: int) -> dict[str, Any]:
    rank = dist.get_rank()
    meter = TrafficMeter(rank, case.ranks_per_node)
    dispatcher, ep_ranks = _build(case, world, meter)
    num_experts = case.experts(world)
    local = num_experts // len(ep_ranks)
    member = ep_ranks.index(rank)
    experts = Experts(expert_weights(num_experts)[member * local : (member + 1) * local])
    tokens, ids, weights, target = unit_data(case.unit(rank), num_experts)
    tokens.requires_grad_(True)
    weights.requires_grad_(True)
    out = dispatcher(tokens, ids, weights, experts)
    (out * target).sum().backward()
    assert tokens.grad is not None and weights.grad is not None and experts.weight.grad is not None
    return {
        "out": out.detach(),
        "tokens_grad": tokens.grad,
        "weights_grad": weights.grad,
        "expert_grad": experts.weight.grad,
        "experts": list(range(member * local, (member + 1) * local)),
        "traffic": meter.snapshot(),
        "condensed": dispatcher.num_condensed if isinstance(dispatcher, Condensing) else None,
    }


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    warnings.simplefilter("error")  # the parent's filterwarnings=error does not reach spawned ranks
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=dt.timedelta(seconds=60))
    try:
        results = {case.name: _run_case(case, world) for case in cases(world)}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclasses.dataclass(frozen=True)
class Run:
    world: int
    ranks: list[dict[str, dict[str, Any]]]
    """Per rank: case name -> what :func:`_run_case` saved."""

    def case(self, name: str) -> Case:
        return next(c for c in cases(self.world) if c.name == name)


@pytest.fixture(scope="module", params=WORLDS, ids=[f"world{w}" for w in WORLDS])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Run:
    world: int = request.param
    out_dir = tmp_path_factory.mktemp(f"dispatch{world}")
    # forkserver: the server imports torch (and this module) once and forks the ranks from that clean,
    # single-threaded process (fork from pytest would copy its threads; spawn re-imports torch per rank).
    mp.get_context("forkserver").set_forkserver_preload([__name__])
    mp.start_processes(
        _worker, args=(world, _free_port(), str(out_dir)), nprocs=world, start_method="forkserver"
    )
    return Run(world, [torch.load(out_dir / f"rank{r}.pt") for r in range(world)])


# ---------------------------------------------------------------------------------------------------
# Reference


class _Spy:
    """A LocalDispatcher that records the routing it was called with (the rows Condensing sends)."""

    def __init__(self, inner: LocalDispatcher) -> None:
        self.inner = inner
        self.expert_ids: list[Tensor] = []

    def __call__(self, tokens: Tensor, expert_ids: Tensor, weights: Tensor, experts: ExpertFn) -> Tensor:
        self.expert_ids.append(expert_ids)
        return self.inner(tokens, expert_ids, weights, experts)


@dataclasses.dataclass
class Reference:
    outs: dict[int, Tensor]
    tokens_grads: dict[int, Tensor]
    weights_grads: dict[int, Tensor]
    expert_grad: Tensor
    """[E, H, H] summed over units."""
    sent_ids: dict[int, Tensor]
    """[P, K'] the (unit's) pairs that leave the source: all T*K, kept ones under capacity or
    condensation (K' = 1 then)."""
    condensed: dict[int, int]


def reference(case: Case, world: int) -> Reference:
    num_experts = case.experts(world)
    experts = Experts(expert_weights(num_experts))
    ref = Reference({}, {}, {}, torch.zeros(0), {}, {})
    for unit in sorted({case.unit(r) for r in range(world)}):
        tokens, ids, weights, target = unit_data(unit, num_experts)
        tokens.requires_grad_(True)
        weights.requires_grad_(True)
        local = LocalDispatcher(num_experts, case.capacity_factor)
        spy = _Spy(local)
        dispatcher: TokenDispatcher = spy if case.threshold is None else Condensing(spy, case.threshold)
        out = dispatcher(tokens, ids, weights, experts)
        (out * target).sum().backward()
        assert tokens.grad is not None and weights.grad is not None
        ref.outs[unit], ref.tokens_grads[unit], ref.weights_grads[unit] = (
            out.detach(),
            tokens.grad,
            weights.grad,
        )
        sent = spy.expert_ids[0]
        if case.capacity_factor is not None:
            sent = sent.reshape(-1)[capacity_keep_mask(sent, num_experts, case.capacity_factor)].unsqueeze(1)
        ref.sent_ids[unit] = sent
        ref.condensed[unit] = dispatcher.num_condensed if isinstance(dispatcher, Condensing) else 0
    assert experts.weight.grad is not None
    ref.expert_grad = experts.weight.grad
    return ref


def assert_matches_reference(run: Run, name: str, replicas_per_expert_grad: int = 1) -> None:
    """Every rank's output and gradients equal the reference; expert grads summed over replicas too."""
    case = run.case(name)
    ref = reference(case, run.world)
    summed = torch.zeros_like(ref.expert_grad)
    for rank, results in enumerate(run.ranks):
        got, unit = results[name], case.unit(rank)
        torch.testing.assert_close(got["out"], ref.outs[unit], **TOL)
        torch.testing.assert_close(got["tokens_grad"], ref.tokens_grads[unit], **TOL)
        torch.testing.assert_close(got["weights_grad"], ref.weights_grads[unit], **TOL)
        summed[got["experts"]] += got["expert_grad"]
        if case.threshold is not None:
            assert got["condensed"] == ref.condensed[unit]
    torch.testing.assert_close(summed, replicas_per_expert_grad * ref.expert_grad, **TOL)


def kind_bytes(results: dict[str, Any], kind: str) -> tuple[int, int]:
    """(intra_node, inter_node) bytes of one kind in a saved snapshot."""
    counts = results["traffic"]["kinds"].get(kind, {"intra_node": 0, "inter_node": 0})
    return counts["intra_node"], counts["inter_node"]


def flat_traffic(
    sent: dict[int, Tensor], ep_ranks: list[int], local: int, rpn: int
) -> tuple[dict[int, tuple[int, int]], dict[int, tuple[int, int]]]:
    """Per source rank, the (intra, inter) bytes a flat exchange sends and receives: one H-row per pair
    (``sent[rank]``, global expert ids) whose EP member is another rank."""
    out = {r: [0, 0] for r in ep_ranks}
    back = {r: [0, 0] for r in ep_ranks}
    for src, ids in sent.items():
        for expert in ids.reshape(-1).tolist():
            dst = ep_ranks[expert // local]
            if dst != src:
                link = 0 if link_class(src, dst, rpn) == INTRA_NODE else 1
                out[src][link] += HIDDEN * ELEMENT
                back[dst][link] += HIDDEN * ELEMENT
    return {r: (b[0], b[1]) for r, b in out.items()}, {r: (b[0], b[1]) for r, b in back.items()}


# ---------------------------------------------------------------------------------------------------
# Distributed tests


@pytest.mark.dist
@pytest.mark.parametrize("name", ["a2a", "a2a_capacity", "a2a_one_per_node", "hier", "hier_one_per_node"])
def test_matches_local_reference(run: Run, name: str) -> None:
    assert_matches_reference(run, name)


@pytest.mark.dist
def test_capacity_drops_pairs(run: Run) -> None:
    # The capacity case must actually drop something, or it tests nothing beyond dropless.
    case = run.case("a2a_capacity")
    ref = reference(case, run.world)
    assert sum(ids.numel() for ids in ref.sent_ids.values()) < run.world * TOKENS * TOP_K


@pytest.mark.dist
@pytest.mark.parametrize("name", ["a2a", "a2a_capacity", "a2a_one_per_node"])
def test_flat_bytes(run: Run, name: str) -> None:
    case = run.case(name)
    ref = reference(case, run.world)
    local = case.experts(run.world) // run.world
    ranks = list(range(run.world))
    sends, receives = flat_traffic(ref.sent_ids, ranks, local, case.ranks_per_node)
    for rank, results in enumerate(run.ranks):
        got = results[name]
        # A rank sends its remote pairs in the dispatch and the combine's gradient, and sends back the
        # rows it received in the combine and the dispatch's gradient.
        assert kind_bytes(got, "dispatch") == kind_bytes(got, "combine_backward") == sends[rank]
        assert kind_bytes(got, "combine") == kind_bytes(got, "dispatch_backward") == receives[rank]
        # Counts: one int64 per (member, local expert) to each other member.
        others = [r for r in ranks if r != rank]
        intra = sum(link_class(rank, r, case.ranks_per_node) == INTRA_NODE for r in others)
        assert kind_bytes(got, "counts") == (intra * local * 8, (len(others) - intra) * local * 8)
        kinds = got["traffic"]["kinds"]
        assert kinds["dispatch"]["calls"] == 1 and kinds["dispatch"]["seconds"] >= 0.0


def _hierarchical_expected(case: Case, world: int, sent: dict[int, Tensor]) -> list[tuple[int, int]]:
    """Per rank (intra, inter) dispatch bytes of the node-deduplicated two-phase dispatch."""
    rpn, local = case.ranks_per_node, case.experts(world) // world
    per_node = min(rpn, world)
    row = HIDDEN * ELEMENT + META
    inter = [0] * world
    intra = [0] * world
    for src in range(world):
        for token_experts in sent[src].tolist():
            members = {e // local for e in token_experts}
            for node in {node_of(m, rpn) for m in members}:
                forwarder = node * per_node + src % per_node  # my peer on that node
                if node != node_of(src, rpn):
                    inter[src] += row
                intra[forwarder] += row * len({m for m in members if node_of(m, rpn) == node} - {forwarder})
    return list(zip(intra, inter, strict=True))


@pytest.mark.dist
@pytest.mark.parametrize("name", ["hier", "hier_one_per_node"])
def test_hierarchical_bytes(run: Run, name: str) -> None:
    case = run.case(name)
    ref = reference(case, run.world)
    expected = _hierarchical_expected(case, run.world, ref.sent_ids)
    got = [kind_bytes(results[name], "dispatch") for results in run.ranks]
    assert got == expected
    # Counts: one int64 to each other member of the intra group (G - 1) and of the cross group (N - 1).
    per_node = min(case.ranks_per_node, run.world)
    for results in run.ranks:
        assert kind_bytes(results[name], "counts") == ((per_node - 1) * 8, (run.world // per_node - 1) * 8)
    flat_name = "a2a" if case.ranks_per_node == 2 else "a2a_one_per_node"
    hier_inter = sum(b[1] for b in got)
    flat_inter = sum(kind_bytes(results[flat_name], "dispatch")[1] for results in run.ranks)
    if node_of(run.world - 1, case.ranks_per_node) == 0:
        assert hier_inter == flat_inter == 0  # one node: no inter-node traffic at all
    elif case.ranks_per_node == 2:
        # Top-2 over >= 2 nodes of 4 experts each: a token with both experts on one remote node crosses
        # once, not twice. (With one rank of 2 experts per node that happens too rarely to pay for the
        # metadata: only the formula is checked there.)
        assert hier_inter < flat_inter
    # The combine sends one pre-reduced H-row back per copy (from the copy's receiver): over all ranks,
    # the dispatch's copies without their metadata.
    copies = [sum(b[link] for b in expected) // (HIDDEN * ELEMENT + META) for link in (0, 1)]
    combine = [sum(kind_bytes(results[name], "combine")[link] for results in run.ranks) for link in (0, 1)]
    assert combine == [n * HIDDEN * ELEMENT for n in copies]


@pytest.mark.dist
def test_monta_matches_reference(run: Run) -> None:
    if run.world < 4:
        pytest.skip("MoNTA needs TP 2 with an EP group of >= 2")
    assert_matches_reference(run, "monta")
    # Duplicated baseline: each TP peer sends every token, so every expert replica sees them all.
    assert_matches_reference(run, "a2a_tp_duplicated", replicas_per_expert_grad=2)
    if run.world >= 8:
        assert_matches_reference(run, "monta_contiguous_ep")


@pytest.mark.dist
def test_monta_bytes(run: Run) -> None:
    if run.world < 4:
        pytest.skip("MoNTA needs TP 2 with an EP group of >= 2")
    case, tp = run.case("monta"), 2
    local = case.experts(run.world) // (run.world // tp)
    for rank, results in enumerate(run.ranks):
        # Rank r's TP slice (rows r*T/t..) goes through the flat exchange of its EP group.
        _, ids, _, _ = unit_data(case.unit(rank), case.experts(run.world))
        part = TOKENS // tp
        mine = ids[rank % tp * part : (rank % tp + 1) * part]
        ep_ranks = next(g for g in case.ep_groups(run.world) if rank in g)
        sends, _ = flat_traffic({rank: mine}, ep_ranks, local, case.ranks_per_node)
        assert kind_bytes(results["monta"], "dispatch") == sends[rank]
    for group in case.tp_groups(run.world):
        monta = [kind_bytes(run.ranks[r]["monta"], "dispatch") for r in group]
        duplicated = [kind_bytes(run.ranks[r]["a2a_tp_duplicated"], "dispatch") for r in group]
        assert duplicated[0] == duplicated[1]  # both peers send the same tokens
        # The peers' slices partition the tokens: together they send what one duplicated sender does,
        # each about half of it.
        assert tuple(map(sum, zip(*monta, strict=True))) == duplicated[0]
        for r in group:
            # The all-gather: this rank's T/t output rows to its t-1 TP peers (on its node).
            assert kind_bytes(run.ranks[r]["monta"], "all_gather") == (
                (tp - 1) * TOKENS // tp * HIDDEN * ELEMENT,
                0,
            )
            assert run.ranks[r]["monta"]["traffic"]["kinds"]["combine"]["calls"] == case.num_chunks


@pytest.mark.dist
def test_condensing(run: Run) -> None:
    # threshold > 1: exactly the inner dispatcher (outputs, gradients and every byte).
    assert_matches_reference(run, "cond_off")
    for results in run.ranks:
        assert results["cond_off"]["condensed"] == 0
        assert results["cond_off"]["traffic"]["kinds"].keys() == results["a2a"]["traffic"]["kinds"].keys()
        for kind in ("dispatch", "combine", "counts"):
            assert kind_bytes(results["cond_off"], kind) == kind_bytes(results["a2a"], kind)
    # threshold 0.99: the near-duplicate tokens reuse their originals' expert outputs.
    assert_matches_reference(run, "cond_a2a")
    assert_matches_reference(run, "cond_hier")
    case = run.case("cond_a2a")
    ref = reference(case, run.world)
    local = case.experts(run.world) // run.world
    sends, _ = flat_traffic(ref.sent_ids, list(range(run.world)), local, case.ranks_per_node)
    for rank, results in enumerate(run.ranks):
        assert results["cond_a2a"]["condensed"] == DUPLICATES * TOP_K
        assert kind_bytes(results["cond_a2a"], "dispatch") == sends[rank]
    total = sum(sum(kind_bytes(results["cond_a2a"], "dispatch")) for results in run.ranks)
    assert total < sum(sum(kind_bytes(results["a2a"], "dispatch")) for results in run.ranks)


# ---------------------------------------------------------------------------------------------------
# Single-process tests


def _naive(tokens: Tensor, ids: Tensor, weights: Tensor, weight: Tensor) -> Tensor:
    rows = []
    for t in range(tokens.shape[0]):
        terms = [weights[t, j] * torch.tanh(tokens[t] @ weight[ids[t, j]]) for j in range(ids.shape[1])]
        rows.append(torch.stack(terms).sum(0))
    return torch.stack(rows)


def test_local_dispatcher_is_the_dense_formula() -> None:
    tokens, ids, weights, _ = unit_data(0, 6)
    experts = Experts(expert_weights(6))
    out = LocalDispatcher(6)(tokens, ids, weights, experts)
    torch.testing.assert_close(out, _naive(tokens, ids, weights, experts.weight.detach()), **TOL)


def test_capacity_keeps_the_first_pairs_per_expert() -> None:
    # 4 tokens, top-2, 2 experts: capacity = ceil(0.5 * 8 / 2) = 2 pairs per expert.
    ids = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]])
    keep = capacity_keep_mask(ids, 2, 0.5)
    # Pairs in token order: expert 0 at flat positions 0, 3, 4, 7 -> keep 0, 3; expert 1 at 1, 2, 5, 6 -> 1, 2.
    assert keep.tolist() == [True, True, True, True, False, False, False, False]
    tokens, _, weights, _ = unit_data(0, 2)
    experts = Experts(expert_weights(2))
    out = LocalDispatcher(2, capacity_factor=0.5)(tokens[:4], ids, weights[:4], experts)
    assert out[2:].abs().sum() == 0  # both pairs of tokens 2 and 3 dropped
    with pytest.raises(ValueError, match="capacity_factor"):
        capacity_keep_mask(ids, 2, 0.0)


def test_condensing_reuses_the_representative_output() -> None:
    tokens, ids, weights, _ = unit_data(0, 6)
    experts = Experts(expert_weights(6))
    condensing = Condensing(LocalDispatcher(6), threshold=0.99)
    out = condensing(tokens, ids, weights, experts)
    d = DUPLICATES
    assert condensing.num_condensed == d * TOP_K and condensing.num_pairs == TOKENS * TOP_K
    assert condensing.condensed_fraction == pytest.approx(d * TOP_K / (TOKENS * TOP_K))
    # A condensed token gets its representative's expert outputs with its own weights.
    w = experts.weight.detach()
    stand_in = _naive(tokens[:d], ids[-d:], weights[-d:], w)
    torch.testing.assert_close(out[-d:], stand_in, **TOL)
    torch.testing.assert_close(out[:-d], _naive(tokens[:-d], ids[:-d], weights[:-d], w), **TOL)


def test_condensing_above_one_is_the_inner_dispatcher() -> None:
    tokens, ids, weights, _ = unit_data(0, 6)
    spy = _Spy(LocalDispatcher(6))
    tokens[1] = tokens[0]  # identical tokens: cosine 1, still not above a threshold > 1
    ids[1] = ids[0]
    Condensing(spy, threshold=1.0)(tokens, ids, weights, Experts(expert_weights(6)))
    assert spy.expert_ids == [ids]


def test_traffic_meter_counts_per_link_and_kind() -> None:
    ticks = iter([1.0, 1.5, 2.0, 4.0])
    meter = TrafficMeter(rank=2, ranks_per_node=2, clock=lambda: next(ticks))
    with meter.timed("dispatch"):
        meter.add_bytes("dispatch", [0, 1, 2, 3], [1, 2, 100, 8])  # rank 3 shares node 1; self not counted
    meter.add_bytes("combine", [3], [5])
    started = meter.start()
    meter.stop("combine", started)
    snap = meter.snapshot()
    assert (snap["intra_node"], snap["inter_node"]) == (13, 3)
    assert snap["kinds"]["dispatch"] == {"intra_node": 8, "inter_node": 3, "seconds": 0.5, "calls": 1}
    assert snap["kinds"]["combine"]["seconds"] == 2.0
    assert meter.bytes_sent(INTRA_NODE, "combine") == 5 and meter.bytes_sent() == 16
    meter.reset()
    assert meter.snapshot()["kinds"] == {}
    with pytest.raises(ValueError, match="differ in length"):
        meter.add_bytes("x", [0], [1, 2])


def test_hierarchical_groups_need_balanced_nodes() -> None:
    # Validation happens before any group is created, so no process group is needed here.
    with pytest.raises(ValueError, match="same number of members on every node"):
        hierarchical_groups([[0, 1, 2]], ranks_per_node=2)
    with pytest.raises(ValueError, match="ascending"):
        hierarchical_groups([[1, 0]], ranks_per_node=2)
