"""`moe-serve --expert-parallel N`: real servers whose engine is split over N ranks on loopback gloo.

Two ranks serve what one process generates (greedy text and logprobs, with concurrent requests batched
together) and report each rank's expert bytes; a rank killed mid-stream stops the server with a failure
status; ranks that cannot fit the experts refuse to start. The ranks' lockstep itself (unseeded random
sampling included) is tested without a server, on gloo ranks in this process's children.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from engine import LLM, SamplingParams
from engine.expert_parallel import ExpertShard, resident_expert_bytes
from engine.expert_placement import contiguous_placement, save_placement
from engine.llm_engine import EngineConfig, LLMEngine
from engine.outputs import RequestOutput
from server.engine_messages import AddRequest, Exit
from server.engine_rank import start_rank
from server.launch import launched
from server.lockstep import LockstepLeader, follow
from tests.conftest import copy_checkpoint, edit_config
from tests.engine.test_expert_parallel import moe_layers, run_ranks
from tests.server.test_cli import children, stream_tokens
from tests.server.test_pruning import samples

SERVE_ARGS = [
    "--threads",
    "1",
    "--max-num-seqs",
    "4",
    "--dtype",
    "float32",
    "--enforce-eager",
    "--request-workers",
    "1",
]
PROMPTS = ["The experts of a layer", "Once upon a time", "Split across two ranks", "A"]


def completion(url: str, prompt: str) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": 1}
    choice: dict[str, Any] = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    return choice


@pytest.mark.slow
def test_two_ranks_serve_what_one_process_generates(tiny_model: Path) -> None:
    offline = LLM(tiny_model, dtype="float32", enforce_eager=True)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)
    wanted = [out.outputs[0] for out in offline.generate(PROMPTS, params, use_tqdm=False)]
    with launched([*SERVE_ARGS, "--model", str(tiny_model), "--expert-parallel", "2"]) as server:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # at once: the ranks batch them together
            served = list(pool.map(functools.partial(completion, server.url), PROMPTS))
        metrics = samples(server.url)
    assert server.process.returncode == 0  # stopped with SIGTERM: every rank told to exit, none failed
    for got, want in zip(served, wanted):
        assert got["text"] == want.text
        assert want.logprobs is not None
        expected = [step[token].logprob for step, token in zip(want.logprobs, want.token_ids)]
        assert got["logprobs"]["token_logprobs"] == pytest.approx(expected, abs=1e-5)
    held = {labels["rank"]: value for labels, value in metrics["moe_serve_expert_weight_bytes"]}
    total = resident_expert_bytes(offline.engine.model)
    assert held == {"0": total / 2, "1": total / 2}


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_server_with_a_failure_status(tiny_model: Path) -> None:
    args = [*SERVE_ARGS, "--model", str(tiny_model), "--expert-parallel", "2"]
    with launched(args, stderr=subprocess.PIPE, text=True) as server:
        engine = next(pid for pid, name in children(server.process.pid).items() if name == "moe-serve-engin")
        (worker,) = (pid for pid, name in children(engine).items() if name == "moe-serve-rank")
        started, result = threading.Event(), {}  # type: ignore[var-annotated]
        client = threading.Thread(target=stream_tokens, args=(server.port, 1800, started, result))
        client.start()
        assert started.wait(30)
        killed = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        _, stderr = server.process.communicate(timeout=30)
        assert time.monotonic() - killed < 5.0
        assert server.process.returncode == 1
        client.join(30)
    assert "the engine stopped" in result["error"]["message"]  # type: ignore[index]
    assert f"expert-parallel engine rank 1 (pid {worker}) exited (killed by SIGKILL)" in stderr
    assert "Traceback" not in stderr


def test_ranks_that_do_not_fit_the_experts_refuse_to_start(tiny_model: Path, tmp_path: Path) -> None:
    serve = [sys.executable, "-m", "server.cli", "--model", str(tiny_model), "--port", "0"]
    too_many = subprocess.run(
        [*serve, "--expert-parallel", "64"], check=False, capture_output=True, text=True, timeout=60
    )
    assert too_many.returncode == 1
    assert "moe-serve: error: 64 ranks do not fit layer 0: it has 8 experts" in too_many.stderr
    placement_file = tmp_path / "placement.json"
    save_placement(contiguous_placement(moe_layers(tiny_model), 8, 4), placement_file)
    other = [*serve, "--expert-parallel", "2", "--expert-placement", str(placement_file)]
    mismatched = subprocess.run(other, check=False, capture_output=True, text=True, timeout=60)
    assert mismatched.returncode == 1
    assert f"moe-serve: error: {placement_file}: the placement is for 4 ranks, not 2" in mismatched.stderr


def test_a_checkpoint_error_on_the_ranks_fails_start_up_with_it(tiny_model: Path, tmp_path: Path) -> None:
    broken = copy_checkpoint(tiny_model, tmp_path / "broken")
    edit_config(broken, vocab_size=16)  # every rank refuses it after the ranks have joined
    serve = [sys.executable, "-m", "server.cli", *SERVE_ARGS, "--model", str(broken), "--expert-parallel", "2"]
    done = subprocess.run([*serve, "--port", "0"], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"moe-serve: error: {broken / 'tokenizer.json'}: " in done.stderr and "vocab_size 16" in done.stderr
    assert "exited (status" not in done.stderr  # rank 0's own error is reported, not the other rank's exit


def lockstep_job(path: Path, rank: int) -> dict[str, Any]:
    """Rank 0 leads (its torch seed differs from rank 1's) with unseeded random requests added between steps;
    every rank records the tokens its own engine generated."""
    torch.manual_seed(rank)
    placement = contiguous_placement(moe_layers(path), 8, 2)
    config = EngineConfig(dtype="float32", device="cpu", max_num_seqs=2, enforce_eager=True)
    config.expert_shard = ExpertShard(placement)
    started = start_rank(path, config, rank, None)
    assert started.group is not None
    tokens: dict[str, list[int]] = {}
    steps: dict[str, int] = {}

    def record(outputs: list[RequestOutput], step: int) -> None:
        for output in outputs:
            tokens[output.request_id] = output.outputs[0].token_ids
            if output.finished:
                steps[output.request_id] = step

    if rank:
        follow(started.engine, started.group, record)
    else:
        lead(started.engine, LockstepLeader(started.group), record)
    return {"tokens": tokens, "finished_at": steps, "bytes": started.expert_bytes}


def lead(engine: LLMEngine, leader: LockstepLeader, record: Any) -> None:
    params = SamplingParams(max_tokens=10, temperature=1.0, min_tokens=3)
    step = 0
    for index, prompt in enumerate([[5, 6, 7], list(range(30, 50)), [9] * 5]):
        command = leader.admit(AddRequest(f"r{index}", prompt, params))
        assert isinstance(command, AddRequest) and command.params.seed is not None
        engine.add_request(command.request_id, command.prompt_token_ids, command.params)
        for _ in range(3):  # a new request joins a running batch
            leader.broadcast(step=True)
            step += 1
            record(engine.step(), step)
    while engine.has_unfinished_requests():
        leader.broadcast(step=True)
        step += 1
        record(engine.step(), step)
    leader.admit(Exit())
    leader.broadcast(step=False)


def test_ranks_in_lockstep_sample_the_same_tokens_unseeded(tiny_model: Path, tmp_path: Path) -> None:
    ranks = run_ranks(2, tmp_path, functools.partial(lockstep_job, tiny_model))
    assert len(ranks[0]["tokens"]) == 3 and ranks[0]["finished_at"]
    assert ranks[1]["tokens"] == ranks[0]["tokens"]
    assert ranks[1]["finished_at"] == ranks[0]["finished_at"]  # every request finished at the same step
    assert ranks[0]["bytes"] == ranks[1]["bytes"]
