"""A deterministic synthetic corpus the tiny model learns in a few steps: repeated motifs.

The corpus has ``NUM_MOTIFS`` motifs of ``MOTIF_LEN`` tokens each, drawn once from the seed. Sample i
repeats motif ``m_i`` from offset ``o_i`` (both drawn from a generator seeded by (seed, i)). After the
first token of a sample, the next token follows from the current one and the motif, so a small model
drives the loss far below the ``ln V`` of uniform guessing within tens of steps; the falling loss is
then a visible check that training (and every gradient path of a layout) works. Any two runs that read
the same sample indices see the same tokens: data parallelism splits sample indices, so every layout
sees the same global batch.
"""

from __future__ import annotations

import torch

__all__ = ["MOTIF_LEN", "NUM_MOTIFS", "batch", "sample"]

NUM_MOTIFS = 32
MOTIF_LEN = 8


def _motifs(vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (NUM_MOTIFS, MOTIF_LEN), generator=generator)


def sample(index: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    """Sample ``index`` of the corpus: ``seq_len + 1`` token ids (inputs and the shifted labels)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    motif = int(torch.randint(0, NUM_MOTIFS, (1,), generator=generator))
    offset = int(torch.randint(0, MOTIF_LEN, (1,), generator=generator))
    positions = (offset + torch.arange(seq_len + 1)) % MOTIF_LEN
    return _motifs(vocab, seed)[motif, positions]


def batch(indices: range, seq_len: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), each [len(indices), seq_len]."""
    rows = torch.stack([sample(i, seq_len, vocab, seed) for i in indices])
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
