"""Output deltas: the engine's DELTA outputs, sent on by the engine process, rebuild exactly the cumulative
outputs of the same requests, and a message's size does not grow with the output's length."""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

from engine.config import DEFAULT_MODEL_DIR
from engine.llm_engine import EngineConfig, LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams
from server.output_delta import DeltaEncoder, apply_delta


def _outputs_per_step(kind: RequestOutputKind) -> list[list[RequestOutput]]:
    """Each step's outputs of the same requests in a fresh engine (the same tokens whatever the output kind)."""
    engine = LLMEngine(DEFAULT_MODEL_DIR, EngineConfig(max_num_seqs=8, kv_cache_memory_bytes=32 << 20))
    requests = {
        "plain": SamplingParams(max_tokens=40, temperature=0.8, seed=1),
        "stop": SamplingParams(max_tokens=40, temperature=0.8, seed=2, stop=["the", "s"]),
        "scored": SamplingParams(max_tokens=12, logprobs=3, prompt_logprobs=2, n=2, seed=3),
        "aborted": SamplingParams(max_tokens=40, ignore_eos=True, seed=4),
    }
    for request_id, params in requests.items():
        engine.add_request(request_id, f"The {request_id} request begins", replace(params, output_kind=kind))
    steps = []
    while engine.has_unfinished_requests():
        steps.append(engine.step())
        if len(steps) == 5:
            engine.abort_request("aborted")
    return steps


def test_deltas_rebuild_every_cumulative_output() -> None:
    cumulative = _outputs_per_step(RequestOutputKind.CUMULATIVE)
    encoder = DeltaEncoder()
    rebuilt: dict[str, RequestOutput] = {}
    for expected, outputs in zip(cumulative, _outputs_per_step(RequestOutputKind.DELTA), strict=True):
        assert [o.request_id for o in outputs] == [o.request_id for o in expected]
        for output, want in zip(outputs, expected):
            rebuilt[output.request_id] = apply_delta(rebuilt.get(output.request_id), encoder.encode(output))
            got = rebuilt[output.request_id]
            assert got.outputs == want.outputs and got.prompt_logprobs == want.prompt_logprobs
            assert (got.finished, got.prompt_token_ids) == (want.finished, want.prompt_token_ids)
        if len(rebuilt) == 4 and "aborted" in rebuilt:
            encoder.forget("aborted")  # aborted after the fifth step: no further output
    assert set(rebuilt) == {"plain", "stop", "scored", "aborted"} and encoder._started == set()
    assert rebuilt["stop"].outputs[0].finish_reason == "stop" and rebuilt["stop"].outputs[0].stop_reason in ("the", "s")
    assert len(rebuilt["scored"].outputs) == 2 and rebuilt["scored"].prompt_logprobs is not None


def test_a_late_delta_is_small(tiny_model: Path) -> None:
    engine = LLMEngine(tiny_model, EngineConfig(max_num_seqs=2, kv_cache_memory_bytes=32 << 20))
    params = SamplingParams(max_tokens=300, ignore_eos=True, logprobs=5, output_kind=RequestOutputKind.DELTA)
    engine.add_request("long", "x", params)
    encoder = DeltaEncoder()
    sizes = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            sizes.append(len(pickle.dumps(encoder.encode(output))))
    assert len(sizes) == 300 and sizes[-1] < 2 * sizes[1]
