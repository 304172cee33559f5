"""Perplexity of a model over fixed token windows, as routed now (with whatever routing policies are installed)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.attention import DenseCausal
from engine.model import MoEForCausalLM


@dataclass(frozen=True)
class Perplexity:
    loss: float  # mean next-token cross-entropy, nats
    tokens: int
    seconds: float  # wall time of the scoring pass

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)


@torch.no_grad()
def perplexity(
    model: MoEForCausalLM, windows: torch.Tensor, batch_size: int = 16, progress: str | None = None
) -> Perplexity:
    """Score [N, seq_len + 1] windows (each predicts its last seq_len tokens) in batches of dense causal attention."""
    if windows.ndim != 2 or len(windows) == 0 or windows.shape[1] < 2:
        raise ValueError(f"perplexity needs [N, seq_len + 1] token windows, got {tuple(windows.shape)}")
    seq_len = windows.shape[1] - 1
    device = model.lm_head.weight.device
    total, count = 0.0, 0
    start = time.perf_counter()
    for b in tqdm(range(0, len(windows), batch_size), desc=progress, unit="batch", disable=progress is None):
        batch = windows[b : b + batch_size].to(device)
        rows = len(batch)
        positions = torch.arange(seq_len, device=device).repeat(rows)
        logits = model.compute_logits(model(batch[:, :-1].reshape(-1), positions, DenseCausal(rows, seq_len)))
        total += float(F.cross_entropy(logits, batch[:, 1:].reshape(-1), reduction="sum"))
        count += rows * seq_len
    return Perplexity(total / count, count, time.perf_counter() - start)
