"""Perplexity measured through a running server's OpenAI API (`echo` + `logprobs` with `max_tokens: 0`), so the
number belongs to exactly what is served: its pruning, routing threshold, dtype and kernels."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import torch


@dataclass(frozen=True)
class ServedPerplexity:
    loss: float  # mean next-token cross-entropy, nats
    tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)


def served_perplexity(
    url: str,
    model: str,
    windows: torch.Tensor,
    windows_per_request: int = 4,
    concurrency: int = 2,
    api_key: str | None = None,
    timeout: float = 300.0,
) -> ServedPerplexity:
    """Score [N, seq_len + 1] token windows as prompts; each predicts its last seq_len tokens (the same windows
    and loss as pruning.perplexity, which scores them offline)."""
    if windows.ndim != 2 or len(windows) == 0 or windows.shape[1] < 2:
        raise ValueError(f"perplexity needs [N, seq_len + 1] token windows, got {tuple(windows.shape)}")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    batches = [windows[i : i + windows_per_request].tolist() for i in range(0, len(windows), windows_per_request)]
    with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:

        def score(batch: list[list[int]]) -> float:
            body = {"model": model, "prompt": batch, "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0}
            response = client.post("/v1/completions", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"{url}/v1/completions answered {response.status_code}: {response.text[:300]}")
            choices = response.json()["choices"]
            if len(choices) != len(batch):
                raise RuntimeError(f"{url}: {len(batch)} prompts scored, {len(choices)} choices answered")
            total = 0.0
            for choice in choices:
                logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or []
                if len(logprobs) != windows.shape[1] or None in logprobs[1:]:
                    raise RuntimeError(
                        f"{url}: expected {windows.shape[1]} prompt logprobs (all but the first numbers), "
                        f"got {len(logprobs)}: {logprobs[:3]}..."
                    )
                total -= sum(logprobs[1:])
            return total

        with ThreadPoolExecutor(concurrency) as pool:
            nll = sum(pool.map(score, batches))
    tokens = windows[:, 1:].numel()
    return ServedPerplexity(nll / tokens, tokens)
