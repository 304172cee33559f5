"""Continuous batching, chunked prefill, preemption and aborts change no tokens and leak no blocks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine import LLM, LLMEngine, ModelConfig, RequestOutputKind, RoutingPolicy, SamplingParams
from engine.llm_engine import EngineConfig
from engine.outputs import RequestOutput

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def prompts(count: int, seed: int = 2) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (int(n),), generator=generator).tolist()
        for n in torch.randint(3, 60, (count,), generator=generator)
    ]


@pytest.fixture(scope="module")
def alone(tiny_model: Path) -> dict[tuple[int, ...], list[int]]:
    """Greedy tokens of each prompt run by itself."""
    llm = LLM(tiny_model, dtype="float32", device="cpu", max_model_len=128)
    return {tuple(p): llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in prompts(8)}


def run_until_done(engine: LLMEngine) -> dict[str, list[int]]:
    finished: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
    return finished


def test_requests_added_while_others_run(tiny_model: Path, alone: dict) -> None:
    engine = LLMEngine(tiny_model, EngineConfig(dtype="float32", device="cpu", max_model_len=128))
    batch = prompts(8)
    finished: dict[str, list[int]] = {}
    for i, prompt in enumerate(batch):
        engine.add_request(str(i), prompt, GREEDY)
        for _ in range(3):  # a few steps between arrivals: new prefills join running decodes
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output.outputs[0].token_ids
    finished.update(run_until_done(engine))
    assert [finished[str(i)] for i in range(len(batch))] == [alone[tuple(p)] for p in batch]


def test_chunked_prefill_and_preemption(tiny_model: Path, alone: dict) -> None:
    model = ModelConfig.from_dir(tiny_model)
    block_bytes = 2 * model.num_layers * 4 * model.num_kv_heads * model.head_dim * 4
    config = EngineConfig(
        dtype="float32",
        device="cpu",
        max_model_len=96,
        block_size=4,
        max_num_batched_tokens=16,  # prompts of up to 60 tokens prefill in chunks
        kv_cache_memory_bytes=30 * block_bytes,  # 120 tokens for 8 sequences of up to 84: preemption
    )
    engine = LLMEngine(tiny_model, config)
    assert engine.block_manager.num_blocks == 30
    batch = prompts(8)
    for i, prompt in enumerate(batch):
        engine.add_request(str(i), prompt, GREEDY)
    finished = run_until_done(engine)
    assert engine.scheduler.num_preemptions > 0
    assert [finished[str(i)] for i in range(len(batch))] == [alone[tuple(p)] for p in batch]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    # Routing of recomputed tokens is not counted again: every token that fed the model counts once per layer.
    fed_tokens = sum(len(p) + len(finished[str(i)]) - 1 for i, p in enumerate(batch))
    assert (engine.expert_load().sum(axis=1) == fed_tokens * model.top_k).all()


def test_abort_frees_blocks_at_once(tiny_model: Path) -> None:
    config = EngineConfig(dtype="float32", device="cpu", max_model_len=128, max_num_batched_tokens=40, max_num_seqs=2)
    engine = LLMEngine(tiny_model, config)
    for i, length in enumerate((30, 50, 20, 20)):
        engine.add_request(str(i), list(range(1, length + 1)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    states = {(seq.status.value, seq.num_computed_tokens < seq.num_prompt_tokens) for seq in engine.scheduler.running}
    assert ("running", True) in states  # a partially prefilled request
    assert engine.scheduler.waiting  # and requests still waiting
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    for i in range(4):
        engine.abort_request(str(i))
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished_requests() and engine.step() == []


def test_prompt_that_cannot_fit_is_rejected(tiny_model: Path) -> None:
    engine = LLMEngine(tiny_model, EngineConfig(dtype="float32", device="cpu", max_model_len=64))
    with pytest.raises(ValueError, match=r"prompt \(60 tokens\) plus max_tokens \(10\) is 70 tokens, more than .* 64"):
        engine.add_request("long", list(range(60)), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="at least one token"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("oov", [1, 10**6], SamplingParams())
    assert not engine.has_unfinished_requests()


def test_kv_cache_smaller_than_one_sequence_is_refused(tiny_model: Path) -> None:
    config = EngineConfig(dtype="float32", device="cpu", max_model_len=128, kv_cache_memory_bytes=4096)
    with pytest.raises(ValueError, match=r"the KV cache holds \d+ tokens, fewer than max_model_len 128"):
        LLMEngine(tiny_model, config)


def test_engine_config_rejects_impossible_settings() -> None:
    with pytest.raises(ValueError, match="EngineConfig.max_num_batched_tokens must be at least 1"):
        EngineConfig(max_num_batched_tokens=0)
    with pytest.raises(ValueError, match="EngineConfig.gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=1.5)


def test_prefix_caching_reuses_blocks_and_changes_no_tokens(tiny_model: Path, alone: dict) -> None:
    engine = LLMEngine(tiny_model, EngineConfig(dtype="float32", device="cpu", max_model_len=128, block_size=4))
    shared = prompts(1, seed=7)[0][:40]
    batch = [shared + p[:10] for p in prompts(4)]
    reference = LLM(tiny_model, dtype="float32", device="cpu", max_model_len=128, enable_prefix_caching=False)
    expected = [o.outputs[0].token_ids for o in reference.generate(batch, GREEDY, use_tqdm=False)]
    engine.add_request("first", batch[0], GREEDY)
    first = run_until_done(engine)
    assert engine.block_manager.prefix_cache_hits == 0
    for i, prompt in enumerate(batch[1:], start=1):
        engine.add_request(str(i), prompt, GREEDY)
    later = run_until_done(engine)
    assert engine.block_manager.prefix_cache_hits == 3 * 40  # 10 shared blocks of 4 tokens, three times
    assert [first["first"], *(later[str(i)] for i in range(1, 4))] == expected
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_prefix_caching_under_preemption(tiny_model: Path) -> None:
    model = ModelConfig.from_dir(tiny_model)
    block_bytes = 2 * model.num_layers * 4 * model.num_kv_heads * model.head_dim * 4
    common = {"dtype": "float32", "device": "cpu", "max_model_len": 96, "block_size": 4, "max_num_batched_tokens": 16}
    shared = prompts(1, seed=9)[0][:24]
    batch = [shared + p[:12] for p in prompts(8)]
    expected = [
        o.outputs[0].token_ids
        for o in LLM(tiny_model, enable_prefix_caching=False, **common).generate(batch, GREEDY, use_tqdm=False)
    ]
    engine = LLMEngine(tiny_model, EngineConfig(kv_cache_memory_bytes=30 * block_bytes, **common))
    for i, prompt in enumerate(batch):
        engine.add_request(str(i), prompt, GREEDY)
    finished = run_until_done(engine)
    assert engine.scheduler.num_preemptions > 0 and engine.block_manager.prefix_cache_hits > 0
    assert [finished[str(i)] for i in range(len(batch))] == expected
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_routing_change_drops_cached_prefixes(tiny_model: Path) -> None:
    llm = LLM(tiny_model, dtype="float32", device="cpu", max_model_len=128, block_size=4)
    prompt = prompts(1, seed=11)[0][:30]
    llm.generate([prompt], GREEDY, use_tqdm=False)
    llm.set_routing_policies({0: RoutingPolicy(top_k=1)})
    hits = llm.engine.block_manager.prefix_cache_hits
    llm.generate([prompt], GREEDY, use_tqdm=False)
    assert llm.engine.block_manager.prefix_cache_hits == hits  # recomputed under the new routing
    llm.engine.add_request("busy", prompt, GREEDY)
    with pytest.raises(RuntimeError, match="no request is in flight"):
        llm.set_routing_policies({})


def test_the_engines_memory_peak_is_its_own_not_its_parents() -> None:
    """A process started by a parent holding 1 GiB inherits that peak in getrusage on Linux; peak_rss_bytes
    (VmHWM) reports the child's own, so a server that calibrated before starting its engine is not blamed."""
    import subprocess
    import sys

    held = bytearray(1 << 30)
    held[::4096] = b"x" * len(held[::4096])  # touch every page
    probe = "import resource; from engine.device import peak_rss_bytes; "
    probe += "print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    own, inherited = (int(v) for v in done.stdout.split())
    assert inherited >= 1 << 30  # what the gauge used to report
    assert own < 900 << 20  # torch imported, nothing else
    del held


def test_delta_outputs_add_up_to_the_cumulative_ones(tiny_model: Path) -> None:
    """Side by side in one batch, a DELTA request's pieces joined equal its CUMULATIVE twin's output after every
    step: text held back for a stop string comes later, never twice; token ids and logprobs once each."""
    engine = LLMEngine(tiny_model, EngineConfig(dtype="float32", device="cpu", max_model_len=128))
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=["zz", "\n\n"], logprobs=2, n=2)
    prompt = prompts(1)[0]
    engine.add_request("cumulative", prompt, params)
    engine.add_request("delta", prompt, replace(params, output_kind=RequestOutputKind.DELTA))
    joined: dict[int, tuple[str, list[int], list]] = {0: ("", [], []), 1: ("", [], [])}
    steps = 0
    while engine.has_unfinished_requests():
        outputs = {output.request_id: output for output in engine.step()}
        assert set(outputs) == {"cumulative", "delta"}
        for piece in outputs["delta"].outputs:
            text, ids, logprobs = joined[piece.index]
            assert piece.logprobs is not None and len(piece.token_ids) == len(piece.logprobs) <= 1
            joined[piece.index] = (text + piece.text, ids + piece.token_ids, logprobs + piece.logprobs)
        for whole in outputs["cumulative"].outputs:
            assert joined[whole.index] == (whole.text, whole.token_ids, whole.logprobs)
        steps += 1
    assert steps == 24 and all(len(ids) == 24 for _, ids, _ in joined.values())


def test_final_only_requests_get_one_output_equal_to_the_cumulative_ones_last(tiny_model: Path) -> None:
    engine = LLMEngine(tiny_model, EngineConfig(dtype="float32", device="cpu", max_model_len=128))
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=["zz"])
    final_only = replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
    prompt = prompts(1)[0]
    engine.add_request("cumulative", prompt, params)
    engine.add_request("final", prompt, final_only)
    seen: dict[str, list[RequestOutput]] = {"cumulative": [], "final": []}
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen[output.request_id].append(output)
    assert len(seen["cumulative"]) == 12 and len(seen["final"]) == 1 and seen["final"][0].finished
    last, final = seen["cumulative"][-1], seen["final"][0]
    assert final.outputs == last.outputs and len(final.outputs[0].token_ids) == 12
    assert final.metrics is not None and last.metrics is not None
    assert final.metrics.first_token_time is not None and final.metrics.first_token_time < final.metrics.finished_time  # type: ignore[operator]
