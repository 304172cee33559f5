"""The benchmarks' common start: requests added and stepped past their prefill, so each further step decodes."""

from __future__ import annotations

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def start_decoding(engine: LLMEngine, name: str, prompts: list[list[int]], params: list[SamplingParams]) -> list[str]:
    """Add one request per prompt (ids `name-B-i`) and step until every sequence is past its prefill, so that
    each further step decodes one token per sequence. Returns the request ids."""
    ids = [f"{name}-{len(prompts)}-{i}" for i in range(len(prompts))]
    for request_id, prompt, request_params in zip(ids, prompts, params, strict=True):
        engine.add_request(request_id, prompt, request_params)
    seqs = [seq for request_id in ids for seq in engine.requests[request_id].seqs]
    while engine.scheduler.waiting or any(s.num_tokens - s.num_computed_tokens > 1 for s in seqs):
        engine.step()
    return ids
