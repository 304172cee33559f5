"""Output deltas: what the engine process sends rebuilds exactly the engine's cumulative outputs, and a
message's size does not grow with the output's length."""

from __future__ import annotations

import pickle
from pathlib import Path

from engine.config import DEFAULT_MODEL_DIR
from engine.llm_engine import EngineConfig, LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from server.output_delta import DeltaEncoder, apply_delta


def test_deltas_rebuild_every_cumulative_output() -> None:
    engine = LLMEngine(DEFAULT_MODEL_DIR, EngineConfig(max_num_seqs=8, kv_cache_memory_bytes=32 << 20))
    requests = {
        "plain": SamplingParams(max_tokens=40, temperature=0.8, seed=1),
        "stop": SamplingParams(max_tokens=40, temperature=0.8, seed=2, stop=["the", "s"]),
        "scored": SamplingParams(max_tokens=12, logprobs=3, prompt_logprobs=2, n=2, seed=3),
        "aborted": SamplingParams(max_tokens=40, ignore_eos=True),
    }
    for request_id, params in requests.items():
        engine.add_request(request_id, f"The {request_id} request begins", params)
    encoder = DeltaEncoder()
    rebuilt: dict[str, RequestOutput] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            delta = encoder.encode(output)
            rebuilt[output.request_id] = apply_delta(rebuilt.get(output.request_id), delta)
            assert rebuilt[output.request_id] == output
        steps += 1
        if steps == 5:
            engine.abort_request("aborted")
            encoder.forget("aborted")
    assert set(rebuilt) == set(requests) and encoder._sent == {}
    assert rebuilt["stop"].outputs[0].finish_reason == "stop"
    assert len(rebuilt["scored"].outputs) == 2 and rebuilt["scored"].prompt_logprobs is not None


def test_a_late_delta_is_small(tiny_model: Path) -> None:
    engine = LLMEngine(tiny_model, EngineConfig(max_num_seqs=2, kv_cache_memory_bytes=32 << 20))
    engine.add_request("long", "x", SamplingParams(max_tokens=300, ignore_eos=True, logprobs=5))
    encoder = DeltaEncoder()
    sizes = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            sizes.append((len(pickle.dumps(output)), len(pickle.dumps(encoder.encode(output)))))
    cumulative, delta = sizes[-1]
    assert delta < 2 * sizes[1][1] and cumulative > 50 * delta
