"""The runtime model's configuration: the shape of a ``ModelSpec`` the bundled runtime trains, and which
experts an EP rank holds."""

from __future__ import annotations

from dataclasses import dataclass

from planner.errors import SpecError
from planner.schema import ModelSpec

__all__ = ["RuntimeModelConfig", "expert_range"]


@dataclass(frozen=True, kw_only=True)
class RuntimeModelConfig:
    """What the runtime builds: a GQA decoder whose FFNs after the first ``first_k_dense_layers`` are MoE."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_query_groups: int
    """Key/value heads; equal to ``num_heads`` for MHA. Divides ``num_heads``."""
    head_dim: int
    """Per-head dimension (``kv_channels``); even, for rotary embeddings."""
    ffn_hidden_size: int
    """FFN width of the dense layers."""
    num_experts: int
    moe_ffn_hidden_size: int
    """FFN width of one routed expert."""
    top_k: int
    vocab_size: int
    shared_expert_ffn_hidden_size: int = 0
    """Width of the shared expert added to every MoE layer's output; 0 for none."""
    first_k_dense_layers: int = 0
    gated: bool = True
    """SwiGLU FFNs (w1, w3, w2); false for a two-matrix GELU MLP (w1, w2)."""
    add_qkv_bias: bool = False
    norm_eps: float = 1e-5
    """RMSNorm epsilon (Megatron's ``--norm-epsilon`` default; ModelSpec does not carry it)."""
    rope_theta: float = 10000.0
    """Rotary base (ModelSpec does not carry it)."""
    aux_loss_coeff: float = 1e-2
    """Weight of the Switch load-balancing loss (Switch Transformer's alpha)."""
    topo_loss_coeff: float = 1e-2
    """Weight of the TA-MoE topology-aware loss; it applies only once a target is set."""
    init_std: float = 0.02
    """Std of the normal initialisation (Megatron's ``--init-method-std`` default); output projections
    use ``init_std / sqrt(2 * num_layers)`` (GPT-2, Megatron's scaled init)."""

    def __post_init__(self) -> None:
        sizes = {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "num_query_groups": self.num_query_groups,
            "head_dim": self.head_dim,
            "ffn_hidden_size": self.ffn_hidden_size,
            "num_experts": self.num_experts,
            "moe_ffn_hidden_size": self.moe_ffn_hidden_size,
            "top_k": self.top_k,
            "vocab_size": self.vocab_size,
        }
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} ({value}) must be positive")
        if self.num_heads % self.num_query_groups:
            raise ValueError(
                f"num_query_groups ({self.num_query_groups}) must divide num_heads ({self.num_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be at most num_experts ({self.num_experts})")
        if not 0 <= self.first_k_dense_layers < self.num_layers:
            raise ValueError(
                f"first_k_dense_layers ({self.first_k_dense_layers}) must be in "
                f"[0, num_layers ({self.num_layers}))"
            )
        if self.shared_expert_ffn_hidden_size < 0:
            raise ValueError(
                f"shared_expert_ffn_hidden_size ({self.shared_expert_ffn_hidden_size}) must be 0 or positive"
            )

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> RuntimeModelConfig:
        """The runtime model of a ModelSpec; a SpecError names every feature the runtime does not run.

        Fields ModelSpec does not carry (``norm_eps``, ``rope_theta``, the loss coefficients, ``init_std``)
        take their defaults; change them with ``dataclasses.replace``.
        """
        name = spec.name or "model"
        unsupported = []
        if spec.attention != "gqa":
            unsupported.append(f"attention is {spec.attention!r} (the runtime runs GQA/MHA attention only)")
        if spec.num_experts is None or spec.moe_router_topk is None:
            unsupported.append("num_experts is 0 (the runtime trains MoE models only)")
        if spec.moe_router_num_groups is not None:
            unsupported.append(
                f"moe_router_num_groups is {spec.moe_router_num_groups} "
                "(no group-limited routing in the runtime)"
            )
        if spec.mtp_num_layers:
            unsupported.append(
                f"mtp_num_layers is {spec.mtp_num_layers} (no multi-token prediction in the runtime)"
            )
        if not spec.untie_embeddings_and_output_weights:
            unsupported.append("untie_embeddings_and_output_weights is false (the runtime unties them)")
        if unsupported or spec.num_experts is None or spec.moe_router_topk is None:
            raise SpecError(f"{name}: the runtime cannot build this model: " + "; ".join(unsupported) + ".")
        return cls(
            num_layers=spec.num_layers,
            hidden_size=spec.hidden_size,
            num_heads=spec.num_attention_heads,
            num_query_groups=spec.query_groups,
            head_dim=spec.head_dim,
            ffn_hidden_size=spec.ffn_hidden_size,
            num_experts=spec.num_experts,
            moe_ffn_hidden_size=spec.expert_ffn_hidden_size,
            top_k=spec.moe_router_topk,
            vocab_size=spec.vocab_size,
            shared_expert_ffn_hidden_size=spec.shared_expert_ffn_hidden_size,
            first_k_dense_layers=spec.first_k_dense_layers,
            gated=spec.gated_linear_unit,
            add_qkv_bias=spec.add_qkv_bias,
        )


def expert_range(num_experts: int, ep_rank: int, ep_size: int) -> range:
    """Global ids of the experts that EP rank ``ep_rank`` of ``ep_size`` holds (a contiguous block)."""
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"ep_size ({ep_size}) must be positive and divide num_experts ({num_experts})")
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank ({ep_rank}) must be in [0, ep_size ({ep_size}))")
    per_rank = num_experts // ep_size
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)
