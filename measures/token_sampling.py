"""The tokens a costly per-token measure (every expert applied, as PES needs) is taken on: a fixed budget per
MoE layer, spread evenly over a whole run however the run is cut into batches."""

from __future__ import annotations

import torch


class EvenTokenSample:
    """Every k-th token of a run of `total_tokens` (k = total_tokens // budget, at least 1), counted across the
    batches the run arrives in, up to `budget` tokens per layer. Counts each layer's tokens seen and sampled."""

    def __init__(self, total_tokens: int, budget: int) -> None:
        if budget < 1:
            raise ValueError(f"a token sample needs a budget of at least 1, got {budget}")
        self.every = max(1, total_tokens // budget)
        self.budget = budget
        self.seen: dict[int, int] = {}
        self.sampled: dict[int, int] = {}

    def rows(self, layer: int, batch_tokens: int, device: torch.device) -> torch.Tensor:
        """The rows to sample of the layer's next batch of `batch_tokens` tokens (maybe none); counts the batch."""
        seen, taken = self.seen.get(layer, 0), self.sampled.get(layer, 0)
        first = min((-seen) % self.every, batch_tokens)  # the step may be longer than the batch
        rows = torch.arange(first, batch_tokens, self.every, device=device)[: self.budget - taken]
        self.seen[layer] = seen + batch_tokens
        self.sampled[layer] = taken + len(rows)
        return rows
