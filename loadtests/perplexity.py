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
    and loss as measures.perplexity, which scores them offline)."""
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


def served_continuation_perplexity(
    url: str,
    model: str,
    windows: torch.Tensor,
    prompt_len: int,
    concurrency: int,
    api_key: str | None = None,
    timeout: float = 300.0,
) -> ServedPerplexity:
    """Perplexity of each window's tokens after its first prompt_len, scored as generated tokens: every window
    is one request that teacher-forces them (`forced_tokens`, logprobs of the tokens it was made to pick), and
    `concurrency` windows run at once, so each generated token shares its steps with other windows' tokens as
    under load. Batch-aware routing (substitution) acts on generated tokens only and depends on batch-mates,
    so this, not prompt scoring, is its cost."""
    if windows.ndim != 2 or not 0 < prompt_len < windows.shape[1]:
        raise ValueError(f"need [N, L] windows longer than prompt_len {prompt_len}, got {tuple(windows.shape)}")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:

        def score(window: list[int]) -> float:
            body = {"model": model, "prompt": window[:prompt_len], "forced_tokens": window[prompt_len:],
                    "logprobs": 0, "temperature": 0, "ignore_eos": True}  # fmt: skip  # a window may hold an EOS
            response = client.post("/v1/completions", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"{url}/v1/completions answered {response.status_code}: {response.text[:300]}")
            logprobs = response.json()["choices"][0]["logprobs"]["token_logprobs"]
            if len(logprobs) != len(window) - prompt_len:
                raise RuntimeError(f"{url}: {len(window) - prompt_len} forced tokens, {len(logprobs)} logprobs")
            return -sum(logprobs)

        with ThreadPoolExecutor(concurrency) as pool:
            nll = sum(pool.map(score, windows.tolist()))
    tokens = windows[:, prompt_len:].numel()
    return ServedPerplexity(nll / tokens, tokens)
