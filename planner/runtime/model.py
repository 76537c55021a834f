"""The runtime's Mixture-of-Experts decoder: single-device model code, parallelism applied from outside.

Shape legend for tensor-name suffixes: B batch, S sequence, H hidden, T tokens (B*S), K top-k,
N routed pairs (T*K), E experts (global), F FFN hidden, D head dim, V vocabulary.

Expert parallelism touches only two places: each MoE layer holds experts [ep_rank*E/ep, (ep_rank+1)*E/ep)
(``LocalExperts``) and moves tokens with a pluggable ``TokenDispatcher`` (``planner/runtime/protocols.py``).
Tensor parallelism is left to the caller: every dense projection is a plain ``nn.Linear`` attribute
(``q_proj k_proj v_proj o_proj``; FFN ``w1`` gate, ``w3`` up, ``w2`` down) and attention reads its head
counts from the projection widths, so sharding a projection needs no change here.

The MoE layer, its router and auxiliary losses are in ``moe.py``; the layers they share with the
dense blocks (norm, rotary attention, MLP) in ``layers.py``; the configuration in ``model_config.py``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from planner.runtime.dispatchers._local import LocalDispatcher
from planner.runtime.layers import MLP, CausalSelfAttention, RMSNorm, causal_attention, rope_cos_sin, to_wide
from planner.runtime.model_config import RuntimeModelConfig, expert_range
from planner.runtime.moe import LocalExperts, MoELayer, Router, load_balancing_loss, topology_aware_loss
from planner.runtime.protocols import TokenDispatcher

__all__ = [
    "MLP",
    "CausalSelfAttention",
    "LocalExperts",
    "MoELayer",
    "MoETransformer",
    "RMSNorm",
    "Router",
    "RuntimeModelConfig",
    "TransformerBlock",
    "causal_attention",
    "expert_parameters",
    "expert_range",
    "init_parameters",
    "load_balancing_loss",
    "load_full_state",
    "merge_ep_states",
    "rope_cos_sin",
    "shard_full_state",
    "topology_aware_loss",
]

DispatcherFactory = Callable[[int], TokenDispatcher]
"""Builds the dispatcher of the MoE layer at a block index (0-based over all blocks)."""


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attention(norm(x))``, then ``x + ffn(norm(x))`` with a dense or MoE FFN."""

    def __init__(self, config: RuntimeModelConfig, ffn: MLP | MoELayer) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attention = CausalSelfAttention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.ffn = ffn

    def forward(self, x_BSH: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
        x_BSH = x_BSH + self.attention(self.attention_norm(x_BSH), cos_SD, sin_SD)
        if isinstance(self.ffn, MoELayer) and self.ffn.migration is not None:
            # The residual sum happens wherever each sequence continues: the migration returns the
            # block's output for the sequences this rank holds next (a different batch).
            return self.ffn.migration(x_BSH, self.ffn_norm(x_BSH), self.ffn)
        out: torch.Tensor = x_BSH + self.ffn(self.ffn_norm(x_BSH))
        return out


class MoETransformer(nn.Module):
    """Embedding, ``first_k_dense_layers`` dense blocks then MoE blocks, final RMSNorm, untied LM head.

    With ``ep_size > 1`` each MoE layer holds experts ``expert_range(E, ep_rank, ep_size)`` and
    ``dispatcher_factory(block_index)`` builds its dispatcher; without a factory the layers use a local
    dispatcher, which needs ``ep_size == 1``. Parameters are uninitialised: call ``init_parameters``.
    """

    def __init__(
        self,
        config: RuntimeModelConfig,
        ep_rank: int = 0,
        ep_size: int = 1,
        dispatcher_factory: DispatcherFactory | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.ep_rank, self.ep_size = ep_rank, ep_size
        local_experts = expert_range(config.num_experts, ep_rank, ep_size)
        if dispatcher_factory is None and ep_size != 1:
            raise ValueError(f"ep_size is {ep_size}: expert parallelism needs a dispatcher_factory")
        blocks = []
        for index in range(config.num_layers):
            ffn: MLP | MoELayer
            if index < config.first_k_dense_layers:
                ffn = MLP(config.hidden_size, config.ffn_hidden_size, config.gated)
            else:
                dispatcher = (
                    dispatcher_factory(index)
                    if dispatcher_factory is not None
                    else LocalDispatcher(config.num_experts)
                )
                ffn = MoELayer(config, local_experts, dispatcher)
            blocks.append(TransformerBlock(config, ffn))
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(blocks)
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.sequence_positions: torch.Tensor | None = None
        """Positions in the sequence of the tokens this rank holds, when context parallelism gives it a
        part of each sequence; None: the whole sequence, 0..S-1."""

    def rope_tables(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary cos and sin of the ``seq_len`` tokens the attention layers of this rank see."""
        positions = self.sequence_positions
        if positions is None:
            positions = torch.arange(seq_len, device=device)
        elif positions.numel() != seq_len:
            raise ValueError(f"this rank holds {positions.numel()} positions of each sequence, not {seq_len}")
        return rope_cos_sin(positions.to(device), self.config.head_dim, self.config.rope_theta)

    def forward(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        """Token ids [B, S] -> logits [B, S, V]."""
        h_BSH = self.embedding(input_ids_BS)
        cos_SD, sin_SD = self.rope_tables(input_ids_BS.shape[1], input_ids_BS.device)
        for block in self.layers:
            h_BSH = block(h_BSH, cos_SD, sin_SD)
        logits_BSV: torch.Tensor = self.lm_head(self.norm(h_BSH))
        return logits_BSV

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers, in block order."""
        return [module for module in self.modules() if isinstance(module, MoELayer)]

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' weighted auxiliary losses from the last forward."""
        losses = [layer.last_aux_loss for layer in self.moe_layers() if layer.last_aux_loss is not None]
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.lm_head.weight.device)

    def loss(self, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross entropy + auxiliary losses, auxiliary losses).

        ``labels_BS[b, s]`` is the target of position s (already shifted, as Megatron's and torchtitan's
        data loaders give it); -100 marks positions to ignore.
        """
        logits_BSV = self(input_ids_BS)
        cross_entropy = F.cross_entropy(
            to_wide(logits_BSV.flatten(0, 1)), labels_BS.flatten(), ignore_index=-100
        )
        aux = self.aux_loss()
        return cross_entropy + aux, aux

    def set_topology_target(self, target_E: torch.Tensor | None) -> None:
        """Set (or with None clear) the TA-MoE target proportions of every MoE layer's router."""
        for layer in self.moe_layers():
            layer.router.set_topology_target(target_E)


def _generator(seed: int, key: str) -> torch.Generator:
    # A stable 63-bit seed per (seed, parameter or expert) so that every tensor's values depend on its
    # name alone: not on the parameter order, the expert placement or the device.
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _normal(shape: torch.Size, std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32) * std


_OUTPUT_PROJECTIONS = ("o_proj", "w2")
"""Parameters whose output is added to the residual stream: initialised with the scaled std."""


def init_parameters(model: MoETransformer, seed: int) -> None:
    """Initialise every parameter from ``seed``, identically whatever ``ep_rank`` and ``ep_size`` are.

    Norm weights 1, biases 0, other weights ``N(0, init_std^2)``, output projections (``o_proj``, ``w2``)
    ``N(0, (init_std / sqrt(2 L))^2)``. Each non-expert parameter draws from a generator keyed by its
    name, each routed expert from one keyed by ``(layer, global expert id)``, on the CPU, so that every
    rank and every expert placement gets the same values. Call it before sharding parameters further.
    """
    std = model.config.init_std
    output_std = std / math.sqrt(2 * model.config.num_layers)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if isinstance(module, LocalExperts):
                for local, expert in enumerate(module.experts):
                    generator = _generator(seed, f"{module_name}.{expert}")
                    for name, param in module.named_parameters(recurse=False):
                        param_std = output_std if name in _OUTPUT_PROJECTIONS else std
                        param[local].copy_(_normal(param.shape[1:], param_std, generator))
                continue
            for name, param in module.named_parameters(recurse=False):
                if isinstance(module, RMSNorm):
                    param.fill_(1.0)
                elif name == "bias":
                    param.zero_()
                else:
                    last = module_name.rsplit(".", 1)[-1]
                    param_std = output_std if last in _OUTPUT_PROJECTIONS else std
                    param.copy_(_normal(param.shape, param_std, _generator(seed, f"{module_name}.{name}")))


def expert_parameters(model: nn.Module) -> dict[str, range]:
    """Name of every routed-expert parameter -> the global expert ids along its dim 0."""
    return {
        f"{module_name}.{name}": module.experts
        for module_name, module in model.named_modules()
        if isinstance(module, LocalExperts)
        for name, _ in module.named_parameters(recurse=False)
    }


def shard_full_state(model: nn.Module, full_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The part of a full (ep=1) state dict, or of any name -> tensor map such as gradients, that
    ``model`` holds: expert tensors sliced to its experts, everything else as is."""
    experts = expert_parameters(model)
    return {
        name: tensor[experts[name].start : experts[name].stop] if name in experts else tensor
        for name, tensor in full_state.items()
    }


def load_full_state(model: nn.Module, full_state: Mapping[str, torch.Tensor]) -> None:
    """Load a full (ep=1) model's state dict into an EP-sharded ``model`` (strict: every key must match)."""
    model.load_state_dict(shard_full_state(model, full_state), strict=True)


def merge_ep_states(
    states: Sequence[Mapping[str, torch.Tensor]], expert_names: Iterable[str]
) -> dict[str, torch.Tensor]:
    """The full (ep=1) state from the states of EP ranks 0..ep-1 (in rank order).

    Expert tensors (``expert_names``, e.g. ``expert_parameters(model)``) are concatenated along dim 0; the
    rest is taken from rank 0.
    """
    names = set(expert_names)
    return {
        name: torch.cat([state[name] for state in states]) if name in names else tensor
        for name, tensor in states[0].items()
    }
