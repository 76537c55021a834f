"""Which collective backend the ranks of a job use: NCCL when every rank of a node has a CUDA GPU.

torch is imported only when a backend is chosen (to count GPUs), so the launching parent of a probe or
a run stays torch-free until then.
"""

from __future__ import annotations

from typing import Literal

from planner.errors import SpecError

__all__ = ["Backend", "choose_backend"]

Backend = Literal["auto", "gloo", "nccl"]
"""``auto`` picks NCCL when every local rank has a GPU, else gloo."""


def _cuda_devices() -> int:
    import torch  # only to count GPUs

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def choose_backend(requested: Backend, ranks_per_node: int) -> Literal["gloo", "nccl"]:
    """``auto``: NCCL when every rank of a node has a CUDA GPU, else gloo; an explicit NCCL is checked."""
    if requested != "auto":
        if requested == "nccl" and _cuda_devices() < ranks_per_node:
            raise SpecError(
                f"--backend nccl needs a CUDA GPU per rank on each node ({ranks_per_node}), but this host has "
                f"{_cuda_devices()}; use --backend gloo for CPU ranks"
            )
        return requested
    return "nccl" if _cuda_devices() >= ranks_per_node else "gloo"
