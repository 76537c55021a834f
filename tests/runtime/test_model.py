"""The runtime's MoE transformer in one process: config, routing losses, dispatch, EP-invariant init."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import pytest
import torch
import torch.nn.functional as F

from planner.catalog import load_model
from planner.errors import SpecError
from planner.runtime.dispatchers._local import LocalDispatcher
from planner.runtime.model import (
    MLP,
    LocalExperts,
    MoELayer,
    MoETransformer,
    Router,
    RuntimeModelConfig,
    expert_parameters,
    init_parameters,
    load_balancing_loss,
    load_full_state,
    merge_ep_states,
    shard_full_state,
    topology_aware_loss,
)
from planner.runtime.protocols import TokenDispatcher


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These ops are tiny: on a loaded 2-core machine intra-op threads only wait for each other (a step
    of the overfit test takes 150 ms with two threads, 5 ms with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _unused_dispatcher(layer_index: int) -> TokenDispatcher:
    """Expert-parallel models here are only built and initialised, never run."""
    return LocalDispatcher(8)


@pytest.fixture(scope="module")
def tiny() -> RuntimeModelConfig:
    return RuntimeModelConfig.from_spec(load_model("tiny-moe"))


@pytest.fixture
def small() -> RuntimeModelConfig:
    """tiny-moe shrunk so that a training loop runs in about a second."""
    return RuntimeModelConfig(
        num_layers=2,
        hidden_size=32,
        num_heads=4,
        num_query_groups=2,
        head_dim=8,
        ffn_hidden_size=64,
        num_experts=4,
        moe_ffn_hidden_size=32,
        top_k=2,
        vocab_size=64,
        shared_expert_ffn_hidden_size=32,
        first_k_dense_layers=1,
    )


def test_config_from_tiny_moe(tiny: RuntimeModelConfig) -> None:
    assert (tiny.num_layers, tiny.hidden_size, tiny.num_heads, tiny.num_query_groups) == (4, 256, 8, 4)
    assert (tiny.head_dim, tiny.ffn_hidden_size, tiny.vocab_size) == (32, 512, 1024)
    assert (tiny.num_experts, tiny.moe_ffn_hidden_size, tiny.top_k) == (8, 256, 2)
    assert (tiny.shared_expert_ffn_hidden_size, tiny.first_k_dense_layers, tiny.gated) == (256, 1, True)


@pytest.mark.parametrize(
    ("model", "update", "message"),
    [
        (
            "deepseek-v3",
            {},
            r"deepseek-v3: .*attention is 'mla'.*GQA/MHA.*moe_router_num_groups.*mtp_num_layers",
        ),
        ("tiny-moe", {"untie_embeddings_and_output_weights": False}, r"tiny-moe: .*unties"),
        ("tiny-moe", {"num_experts": None, "moe_router_topk": None}, r"MoE models only"),
    ],
)
def test_unsupported_spec_is_a_clear_error(model: str, update: dict[str, object], message: str) -> None:
    spec = load_model(model).model_copy(update=update)
    with pytest.raises(SpecError, match=message):
        RuntimeModelConfig.from_spec(spec)


def test_forward_shapes_and_ep_placement(tiny: RuntimeModelConfig) -> None:
    model = MoETransformer(tiny)
    init_parameters(model, seed=0)
    logits = model(torch.randint(0, tiny.vocab_size, (2, 8)))
    assert logits.shape == (2, 8, tiny.vocab_size)
    assert [type(block.ffn) for block in model.layers] == [MLP, MoELayer, MoELayer, MoELayer]
    assert len(model.moe_layers()) == 3
    assert model.moe_layers()[0].experts.w1.shape == (8, 256, 256)
    sharded = MoETransformer(tiny, ep_rank=1, ep_size=4, dispatcher_factory=_unused_dispatcher)
    assert sharded.moe_layers()[0].experts.experts == range(2, 4)
    assert sharded.moe_layers()[0].experts.w2.shape == (2, 256, 256)


def test_mha_gelu_qkv_bias_variant_in_float64(small: RuntimeModelConfig) -> None:
    config = dataclasses.replace(small, num_query_groups=4, gated=False, add_qkv_bias=True)
    model = MoETransformer(config).double()
    init_parameters(model, seed=0)
    assert model.layers[0].ffn.w3 is None and model.layers[0].attention.q_proj.bias is not None
    tokens = torch.randint(0, config.vocab_size, (2, 10))
    logits = model(tokens)
    assert logits.dtype == torch.float64 and logits.shape == (2, 10, config.vocab_size)
    # Causal: changing the last token leaves every earlier position's logits unchanged.
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % config.vocab_size
    # (To rounding: the changed token's routing changes how many rows each expert's GEMM multiplies, which
    # moves the other rows' float64 sums by ~1e-17; a causality leak would be of the logits' own size.)
    torch.testing.assert_close(model(changed)[:, :-1], logits[:, :-1], rtol=0, atol=1e-12)
    loss, _ = model.loss(tokens, tokens)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_ep_without_dispatcher_and_bad_ep_size_are_errors(tiny: RuntimeModelConfig) -> None:
    with pytest.raises(ValueError, match="needs a dispatcher_factory"):
        MoETransformer(tiny, ep_rank=0, ep_size=2)
    with pytest.raises(ValueError, match=r"ep_size \(3\) must be positive and divide num_experts \(8\)"):
        MoETransformer(tiny, ep_rank=0, ep_size=3, dispatcher_factory=_unused_dispatcher)


def test_overfits_a_fixed_batch(small: RuntimeModelConfig) -> None:
    torch.manual_seed(0)
    model = MoETransformer(small)
    init_parameters(model, seed=1)
    tokens = torch.randint(0, small.vocab_size, (2, 17))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss, aux = model.loss(inputs, labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # Starts near ln(V) = ln 64 = 4.16 (plus aux ~ 0.01 per MoE layer); memorising 32 tokens is easy.
    assert losses[0] == pytest.approx(4.16, abs=0.3)
    assert losses[-1] < 0.3 * losses[0]
    assert 0 < aux.item() < 0.1


def _naive_moe(
    tokens: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, experts: LocalExperts
) -> torch.Tensor:
    """out[t] = sum_j w_tj * expert_{e_tj}(x_t), one token and one expert at a time, from the weights."""
    rows = []
    for t in range(tokens.shape[0]):
        x, row = tokens[t], torch.zeros_like(tokens[t])
        for j in range(expert_ids.shape[1]):
            e = int(expert_ids[t, j])
            h = x @ experts.w1[e]
            h = F.silu(h) * (x @ experts.w3[e]) if experts.w3 is not None else F.gelu(h)
            row = row + weights[t, j] * (h @ experts.w2[e])
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("gated", [True, False])
def test_local_dispatcher_matches_per_token_loop_with_gradients(gated: bool) -> None:
    torch.manual_seed(0)
    num_experts, hidden, tokens_count, top_k = 4, 6, 9, 2
    experts = LocalExperts(hidden, 5, range(num_experts), gated).double()
    for param in experts.parameters():
        torch.nn.init.normal_(param)
    tokens = torch.randn(tokens_count, hidden, dtype=torch.float64, requires_grad=True)
    # Every expert gets tokens except expert 3 (an empty group must work too).
    expert_ids = torch.stack([torch.randperm(3)[:top_k] for _ in range(tokens_count)])
    weights = torch.rand(tokens_count, top_k, dtype=torch.float64, requires_grad=True)

    out = LocalDispatcher(num_experts)(tokens, expert_ids, weights, experts)
    reference = _naive_moe(tokens, expert_ids, weights, experts)
    torch.testing.assert_close(out, reference)
    probe = torch.randn_like(out)
    inputs: Sequence[torch.Tensor] = [tokens, weights, *experts.parameters()]
    grads = torch.autograd.grad((out * probe).sum(), inputs)
    reference_grads = torch.autograd.grad((reference * probe).sum(), inputs)
    for grad, reference_grad in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(grad, reference_grad)


def test_load_balancing_loss_by_hand() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.4, 0.1, 0.1, 0.4]])
    expert_ids = torch.tensor([[0, 1], [1, 2], [0, 3]])
    # f = (2, 2, 1, 1) / 6 pairs; P = column means = (1.0, 1.0, 0.4, 0.6) / 3
    # E * sum f P = 4 * (2*1.0 + 2*1.0 + 1*0.4 + 1*0.6) / 18 = 4 * 5 / 18 = 10/9
    assert load_balancing_loss(probs, expert_ids).item() == pytest.approx(10 / 9)
    # Perfectly uniform routing gives 1.
    uniform = torch.full((4, 4), 0.25)
    assert load_balancing_loss(uniform, torch.tensor([[0], [1], [2], [3]])).item() == pytest.approx(1.0)


def test_router_weights_sum_to_one_and_aux_is_scaled() -> None:
    torch.manual_seed(0)
    router = Router(hidden_size=8, num_experts=6, top_k=3, aux_loss_coeff=0.5)
    x = torch.randn(10, 8)
    expert_ids, weights, aux = router(x)
    assert expert_ids.dtype == torch.int64 and expert_ids.shape == (10, 3)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(10))
    probs = torch.softmax(router.gate(x), dim=-1)
    torch.testing.assert_close(
        weights, probs.gather(1, expert_ids) / probs.gather(1, expert_ids).sum(-1, True)
    )
    torch.testing.assert_close(aux, 0.5 * load_balancing_loss(probs, expert_ids))


def test_topology_aware_loss_is_zero_on_target_and_positive_off_it() -> None:
    target = torch.tensor([0.4, 0.4, 0.1, 0.1])
    # Ten tokens, top-1, routed exactly in the target proportions, probabilities equal to the target.
    matched_ids = torch.tensor([[0], [0], [0], [0], [1], [1], [1], [1], [2], [3]])
    assert topology_aware_loss(target.expand(10, 4), matched_ids, target).item() == pytest.approx(
        0.0, abs=1e-6
    )
    # Uniform routing (f = P = 1/4): sum (1/16) / c_hat - 1 = (2.5 + 2.5 + 10 + 10) / 16 - 1 = 0.5625,
    # the chi-square divergence sum (f - c_hat)^2 / c_hat of the uniform dispatch from the target.
    uniform_ids = torch.tensor([[0], [1], [2], [3]] * 2)
    assert topology_aware_loss(torch.full((8, 4), 0.25), uniform_ids, target).item() == pytest.approx(0.5625)
    # A uniform target reduces it to the Switch loss minus 1.
    probs = torch.softmax(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    torch.testing.assert_close(
        topology_aware_loss(probs, uniform_ids, torch.full((4,), 0.25)),
        load_balancing_loss(probs, uniform_ids) - 1,
    )


def test_router_adds_the_topology_loss_once_a_target_is_set() -> None:
    torch.manual_seed(0)
    router = Router(hidden_size=8, num_experts=4, top_k=2, aux_loss_coeff=0.1, topo_loss_coeff=0.3)
    x = torch.randn(12, 8)
    router.set_topology_target(torch.tensor([4.0, 4.0, 1.0, 1.0]))  # normalised to (0.4, 0.4, 0.1, 0.1)
    expert_ids, _, aux = router(x)
    probs = torch.softmax(router.gate(x), dim=-1)
    expected = 0.1 * load_balancing_loss(probs, expert_ids) + 0.3 * topology_aware_loss(
        probs, expert_ids, torch.tensor([0.4, 0.4, 0.1, 0.1])
    )
    torch.testing.assert_close(aux, expected)
    assert "topology_target" not in router.state_dict()
    with pytest.raises(ValueError, match="4 positive proportions"):
        router.set_topology_target(torch.tensor([1.0, 0.0, 1.0, 1.0]))


@pytest.mark.parametrize("ep_size", [2, 4])
def test_init_is_independent_of_expert_placement(small: RuntimeModelConfig, ep_size: int) -> None:
    config = dataclasses.replace(small, num_layers=3, num_experts=8)
    full = MoETransformer(config)
    init_parameters(full, seed=7)
    shards = []
    for rank in range(ep_size):
        shard = MoETransformer(config, ep_rank=rank, ep_size=ep_size, dispatcher_factory=_unused_dispatcher)
        init_parameters(shard, seed=7)
        shards.append(shard)
    names = expert_parameters(shards[0])
    assert sorted(names) == [f"layers.{i}.ffn.experts.{w}" for i in (1, 2) for w in ("w1", "w2", "w3")]
    merged = merge_ep_states([shard.state_dict() for shard in shards], names)
    full_state = full.state_dict()
    assert merged.keys() == full_state.keys()
    for name, tensor in full_state.items():
        assert torch.equal(merged[name], tensor), name
    # The other direction: the last rank's slice of the full state is exactly its own initialisation.
    loaded = MoETransformer(
        config, ep_rank=ep_size - 1, ep_size=ep_size, dispatcher_factory=_unused_dispatcher
    )
    load_full_state(loaded, full_state)
    for name, tensor in shards[-1].state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # Any name -> tensor map (gradients of a single-process run, say) maps the same way.
    grads = shard_full_state(loaded, {"layers.1.ffn.experts.w1": torch.arange(8.0).view(8, 1, 1)})
    assert grads["layers.1.ffn.experts.w1"].flatten().tolist() == list(range(8 - 8 // ep_size, 8))
    other = MoETransformer(config)
    init_parameters(other, seed=8)
    assert not torch.equal(
        other.state_dict()["layers.1.ffn.experts.w1"], full_state["layers.1.ffn.experts.w1"]
    )


def test_config_rules(small: RuntimeModelConfig) -> None:
    with pytest.raises(ValueError, match=r"num_query_groups \(3\) must divide num_heads \(4\)"):
        dataclasses.replace(small, num_query_groups=3)
    with pytest.raises(ValueError, match=r"top_k \(5\) must be at most num_experts \(4\)"):
        dataclasses.replace(small, top_k=5)


def test_balance_loss_over_a_sequence_split_equals_the_loss_over_the_whole_sequence() -> None:
    """Sequence parallelism: each half's loss, with the statistics summed over both halves, is the whole's."""
    from planner.runtime.model import load_balancing_loss

    generator = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(12, 8, generator=generator), dim=-1)
    ids = torch.topk(probs, 2, dim=-1).indices
    whole = load_balancing_loss(probs, ids)
    assert load_balancing_loss(probs, ids, token_sum=lambda x: x) == pytest.approx(whole.item(), rel=1e-6)

    def stats(p: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(i.reshape(-1), minlength=8).to(p.dtype)
        return torch.cat([counts, p.sum(dim=0), torch.tensor([float(p.shape[0])])])

    first, second = (probs[:6], ids[:6]), (probs[6:], ids[6:])
    for mine, other in ((first, second), (second, first)):
        theirs = stats(*other)
        split = load_balancing_loss(*mine, token_sum=lambda x, theirs=theirs: x + theirs)
        assert split.item() == pytest.approx(whole.item(), rel=1e-6)
