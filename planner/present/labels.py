"""Short labels for reports and figures (no rich: the figure writer and the workflows use them too)."""

from __future__ import annotations

from planner.schema import MemoryUse, ParallelConfig

__all__ = ["layout_label", "memory_held_by"]


def layout_label(p: ParallelConfig) -> str:
    """A layout in one line: ``tp2 pp8 vpp4 ep16 etp1 dp8 edp1 mbs1``."""
    text = f"tp{p.tp} pp{p.pp}" + (f" vpp{p.vpp}" if p.vpp > 1 else "") + (f" cp{p.cp}" if p.cp > 1 else "")
    return text + f" ep{p.ep} etp{p.etp} dp{p.dp} edp{p.edp} mbs{p.micro_batch}"


def memory_held_by(use: MemoryUse) -> list[tuple[str, float]]:
    """``(what holds it, bytes)`` of a GPU's peak memory, in the order reports list them."""
    return [
        ("weights", use.weights),
        ("gradients", use.gradients),
        ("optimizer state", use.optimizer),
        (f"activations ({use.in_flight_microbatches:g} micro-batches in flight)", use.activations),
        *((f"  {module}", amount) for module, amount in use.activations_by_module.items()),
        ("logits", use.logits),
        ("dispatch buffers", use.dispatch_buffers),
        ("reserve (CUDA context, NCCL, allocator)", use.reserve),
        *((("CUDA graphs' static buffers", use.cuda_graph_buffers),) if use.cuda_graph_buffers else ()),
        *((("TP overlap's userbuffers", use.tp_overlap_buffers),) if use.tp_overlap_buffers else ()),
    ]
