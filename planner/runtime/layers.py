"""The layers dense and MoE blocks share: RMSNorm, rotary causal self-attention (GQA) and the MLP.

Shape legend as in ``model.py``. Tensor parallelism is left to the caller: every projection is a plain
``nn.Linear`` attribute and attention reads its head counts from the projection widths.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from planner.runtime.model_config import RuntimeModelConfig

__all__ = ["MLP", "CausalSelfAttention", "RMSNorm", "causal_attention", "rope_cos_sin", "to_wide"]


def to_wide(x: torch.Tensor) -> torch.Tensor:
    # Norms, rotations, softmax and the loss run in float32 at least (float64 stays float64, so that a
    # float64 model can be checked against a reference to 1e-12).
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``, in float32 at least (Zhang & Sennrich, arXiv 1910.07467)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = to_wide(x)
        normed = wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(wide.dtype)).to(x.dtype)


def rope_cos_sin(positions_S: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [S, D] of rotary embeddings (RoFormer, arXiv 2104.09864), half-split layout (Llama),
    at the sequence positions ``positions_S`` of the tokens (0..S-1 unless context parallelism splits
    the sequence)."""
    device = positions_S.device
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles_SD2 = torch.outer(positions_S.to(torch.float32), inv_freq)
    angles_SD = torch.cat((angles_SD2, angles_SD2), dim=-1)
    return angles_SD.cos(), angles_SD.sin()


def _apply_rope(x_BNSD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    first, second = x_BNSD.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    wide = to_wide(x_BNSD)
    return (wide * cos_SD.to(wide.dtype) + to_wide(rotated) * sin_SD.to(wide.dtype)).to(x_BNSD.dtype)


CoreAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""Causal attention of q [B, heads, S, D] over k, v [B, groups, S, D] -> [B, heads, S, D]."""


def causal_attention(
    q_BNSD: torch.Tensor, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor, mask_SK: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal attention; query head h reads key/value group h // (heads / groups), Megatron's and Hugging
    Face's order. Without ``mask_SK`` queries and keys are the same whole sequence; with it (True where a
    query may read a key) the keys may come from elsewhere (context parallelism)."""
    repeat = q_BNSD.shape[1] // k_BGSD.shape[1]
    if repeat > 1:
        k_BGSD, v_BGSD = k_BGSD.repeat_interleave(repeat, dim=1), v_BGSD.repeat_interleave(repeat, dim=1)
    if mask_SK is None:
        return F.scaled_dot_product_attention(q_BNSD, k_BGSD, v_BGSD, is_causal=True)
    return F.scaled_dot_product_attention(q_BNSD, k_BGSD, v_BGSD, attn_mask=mask_SK)


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention with grouped key/value heads (GQA; MHA when groups == heads) and RoPE."""

    core: CoreAttention | None = None
    """What attends when not :func:`causal_attention`: context parallelism, whose keys span ranks."""

    def __init__(self, config: RuntimeModelConfig) -> None:
        super().__init__()
        c = config
        self.head_dim = c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.add_qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_query_groups * c.head_dim, bias=c.add_qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_query_groups * c.head_dim, bias=c.add_qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x_BSH: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
        # Head counts come from the projection widths, not the config, so that a tensor-parallel caller can
        # shard q/k/v by columns and o by rows without touching this code. Explicit sizes, not -1: a rank
        # may hold no sequence at all (sequence migration).
        q, k, v = (self._heads(proj(x_BSH)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = _apply_rope(q, cos_SD, sin_SD), _apply_rope(k, cos_SD, sin_SD)
        out_BNSD = (self.core or causal_attention)(q, k, v)
        out: torch.Tensor = self.o_proj(out_BNSD.transpose(1, 2).flatten(2))
        return out

    def _heads(self, x_BSF: torch.Tensor) -> torch.Tensor:
        """[B, S, heads * D] -> [B, heads, S, D]."""
        batch, seq, width = x_BSF.shape
        return x_BSF.view(batch, seq, width // self.head_dim, self.head_dim).transpose(1, 2)


class MLP(nn.Module):
    """Dense FFN: SwiGLU ``w2(silu(w1 x) * w3 x)`` (Shazeer, arXiv 2002.05202) or ``w2(gelu(w1 x))``."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, gated: bool) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, ffn_hidden_size, bias=False) if gated else None
        self.w2 = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.w1(x)) * self.w3(x) if self.w3 is not None else F.gelu(self.w1(x))
        out: torch.Tensor = self.w2(h)
        return out
