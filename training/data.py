"""The batches the trainer draws from the train split's token stream."""

from __future__ import annotations

import torch


def train_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int, step: int) -> torch.Tensor:
    """[batch, seq_len + 1] windows at random offsets, a function of (seed, step) only, so a resumed run
    draws exactly the batches the killed run would have."""
    if len(tokens) < seq_len + 2:
        raise ValueError(f"the train split has {len(tokens)} tokens, too few for sequences of {seq_len}")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=generator)
    return torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])
