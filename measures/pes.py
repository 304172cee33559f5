"""PES (Pairwise Expert Similarity), as the SimBal paper defines it: apply every expert of a layer to a token,
take the mean pairwise cosine of their outputs, and average over tokens. High PES means redundant experts.

The per-pair mean cosine matrix [E, E] is kept too: it is the redundancy map pruning uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expert_cosines(outputs: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of expert outputs [E, T, H] per token: [T, E, E]."""
    unit = F.normalize(outputs.float(), dim=-1)
    return torch.einsum("eth,fth->tef", unit, unit)


def pes_per_token(cosines: torch.Tensor) -> torch.Tensor:
    """C(x) = 2 / (N (N - 1)) * sum_{i<j} cos(f_i(x), f_j(x)) from [T, E, E] cosines: [T]."""
    n = cosines.shape[-1]
    off_diagonal = cosines.sum(dim=(-1, -2)) - cosines.diagonal(dim1=-2, dim2=-1).sum(-1)
    return off_diagonal / (n * (n - 1))


def pes_of(similarity: torch.Tensor) -> float:
    """A layer's PES from its mean pairwise cosine matrix [E, E] (the mean of its off-diagonal entries)."""
    return float(pes_per_token(similarity[None])[0])
