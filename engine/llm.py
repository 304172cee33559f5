"""Offline batch generation, shaped as vLLM's `LLM` so its users feel at home."""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from engine.llm_engine import EngineConfig, LLMEngine
from engine.outputs import RequestOutput
from engine.routing import RoutingPolicy
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.tokenizer import ModelTokenizer

Prompt = str | list[int]


class LLM:
    """Load a checkpoint once, then generate for many prompts with continuous batching.

    `LLM(model=path, dtype="auto", device="auto", **engine_args)`; engine_args are EngineConfig fields
    (max_model_len, max_num_seqs, max_num_batched_tokens, block_size, kv_cache_memory_bytes, moe_backend,
    enforce_eager, ...). Unless enforce_eager, the forward is compiled here, as vLLM does at start-up (from
    inductor's cache after the first time).
    """

    def __init__(self, model: str | Path, dtype: str = "auto", device: str = "auto", **engine_args: Any) -> None:
        self.engine = LLMEngine(model, EngineConfig(dtype=dtype, device=device, **engine_args))
        if not self.engine.config.enforce_eager:
            self.engine.warm_up()
        self._next_id = 0

    def get_tokenizer(self) -> ModelTokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | SequenceOf[Prompt],
        sampling_params: SamplingParams | SequenceOf[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (strings or token-id lists); results come back in input order. The engine
        builds each request's output once, when it finishes (RequestOutputKind.FINAL_ONLY, as vLLM's LLM does)."""
        batch = _as_prompt_list(prompts)
        params = sampling_params or SamplingParams()
        per_prompt = [params] * len(batch) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(batch):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(batch)} prompts")
        final_only = {id(p): replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in per_prompt}
        per_prompt = [final_only[id(p)] for p in per_prompt]
        ids = []
        try:
            for prompt, prompt_params in zip(batch, per_prompt):
                request_id = str(self._next_id)
                self._next_id += 1
                self.engine.add_request(request_id, prompt, prompt_params)
                ids.append(request_id)
            finished: dict[str, RequestOutput] = {}
            with tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm) as progress:
                while self.engine.has_unfinished_requests():
                    for output in self.engine.step():
                        if output.finished:
                            finished[output.request_id] = output
                            progress.update(1)
        except BaseException:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return [finished[request_id] for request_id in ids]

    def expert_load(self) -> np.ndarray:
        """Routed (token, expert) pairs per [layer, expert] since load or the last reset."""
        return self.engine.expert_load()

    def reset_expert_load(self) -> None:
        self.engine.reset_expert_load()

    def set_routing_policies(self, policies: dict[int, RoutingPolicy]) -> None:
        """Install per-layer routing policies (the pruning seam); an empty dict restores default routing."""
        self.engine.set_routing_policies(policies)


def _as_prompt_list(prompts: Prompt | SequenceOf[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items: list[Any] = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # one prompt given as token ids
    return items
