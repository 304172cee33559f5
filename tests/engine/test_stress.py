"""Randomized traffic under memory pressure: block accounting holds every step and no token changes."""

from __future__ import annotations

import random
from pathlib import Path

from engine import LLM, LLMEngine, ModelConfig, SamplingParams
from engine.llm_engine import EngineConfig


def test_random_adds_aborts_and_steps(tiny_model: Path) -> None:
    rng = random.Random(0)
    model = ModelConfig.from_dir(tiny_model)
    block_bytes = 2 * model.num_layers * 4 * model.num_kv_heads * model.head_dim * 4
    settings = {"dtype": "float32", "device": "cpu", "max_model_len": 64, "block_size": 4}
    engine = LLMEngine(
        tiny_model,
        EngineConfig(kv_cache_memory_bytes=24 * block_bytes, max_num_batched_tokens=12, max_num_seqs=6, **settings),
    )
    solo = LLM(tiny_model, enable_prefix_caching=False, **settings)
    system_prompt = [rng.randrange(256) for _ in range(9)]
    requests: dict[str, tuple[list[int], SamplingParams]] = {}
    finished: dict[str, list[list[int]]] = {}
    aborted: set[str] = set()
    for step in range(300):
        if step < 200 and rng.random() < 0.3:
            request_id = f"r{step}"
            prompt = (system_prompt if rng.random() < 0.5 else []) + [
                rng.randrange(256) for _ in range(rng.randrange(1, 20))
            ]
            params = SamplingParams(
                temperature=0.0,
                max_tokens=rng.randrange(1, 16),
                ignore_eos=True,
                n=rng.choice((1, 1, 2)),
                prompt_logprobs=rng.choice((None, None, 1)),
            )
            engine.add_request(request_id, prompt, params)
            requests[request_id] = (prompt, params)
        if rng.random() < 0.05 and engine.requests:
            victim = rng.choice(sorted(engine.requests))
            engine.abort_request(victim)
            aborted.add(victim)
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = [c.token_ids for c in output.outputs]
        held = {block for seq in engine.scheduler.running for block in seq.block_table}
        assert all(not seq.block_table for seq in engine.scheduler.waiting)
        assert engine.block_manager.num_free_blocks + len(held) == engine.block_manager.num_blocks
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = [c.token_ids for c in output.outputs]

    assert engine.scheduler.num_preemptions > 0 and engine.block_manager.prefix_cache_hits > 0 and aborted
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks and not engine.requests
    assert set(finished) | aborted == set(requests)
    for request_id, completions in finished.items():
        prompt, params = requests[request_id]
        alone = solo.generate(
            [prompt], SamplingParams(temperature=0.0, max_tokens=params.max_tokens, ignore_eos=True), use_tqdm=False
        )
        assert all(tokens == alone[0].outputs[0].token_ids for tokens in completions), request_id
