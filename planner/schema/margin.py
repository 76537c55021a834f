"""The memory every GPU keeps free under a plan (``moeplan solve --memory-margin``).

The cost model's peak already holds a fixed reserve for the CUDA context, NCCL and the allocator
(``costmodel.memory.RESERVE_BYTES``). The margin is headroom on top of it, for what no estimate
prices: routing spikes early in training (Megatron-Core's MoE guide: out-of-memory in the first
100-300 steps from routing imbalance, ``../shared/reference/anchors.md`` §1.7), fragmentation beyond
the reserve, a profiler or a larger eval batch. The default, 5% of HBM (4 GiB of an 80 GiB GPU), is a
round figure chosen here, not measured (checking it against the memory of published runs is issue
16's). ``0`` packs plans to the model's limit.

Written as a percentage of HBM (``5%``), a fraction (``0.05``) or GiB (``4GiB``).
"""

from __future__ import annotations

import re

__all__ = ["DEFAULT_MEMORY_MARGIN", "check_memory_margin", "memory_margin_bytes"]

DEFAULT_MEMORY_MARGIN = "5%"
MAX_FRACTION = 0.5
"""A margin of half the GPU or more is a typo, not headroom."""
_GIB = 2**30
_FORM = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(%|gib|gb|g)?\s*$", re.IGNORECASE)


def _parsed(text: str) -> tuple[float, bool]:
    """(value, is_fraction_of_hbm): a fraction in [0, MAX_FRACTION) or GiB."""
    found = _FORM.match(str(text))
    rule = "a percentage of HBM (5%), a fraction (0.05) or GiB (4GiB)"
    if found is None:
        raise ValueError(f"memory margin '{text}' is not {rule}")
    value, unit = float(found.group(1)), (found.group(2) or "").lower()
    if unit == "%":
        value, fraction = value / 100, True
    elif unit:
        return value, False
    elif value >= 1:
        raise ValueError(
            f"memory margin '{text}' is ambiguous: write {value:g}GiB for GiB or {value:g}% for a percentage"
        )
    else:
        fraction = True
    if value >= MAX_FRACTION:
        raise ValueError(
            f"memory margin '{text}' keeps {value:.0%} of every GPU free; it must be below {MAX_FRACTION:.0%}"
        )
    return value, fraction


def check_memory_margin(text: str) -> str:
    """``text`` when it is a margin (raises ValueError naming the rule otherwise)."""
    _parsed(text)
    return text


def memory_margin_bytes(text: str, hbm_bytes: float) -> float:
    """The bytes ``text`` keeps free on a GPU of ``hbm_bytes``."""
    value, fraction = _parsed(text)
    return value * hbm_bytes if fraction else value * _GIB
