"""The engine process behind the server: concurrent streams batch together, closing or cancelling a stream
aborts it at once, bad requests fail before streaming, the queue bound refuses work instead of growing, and a
dead engine process fails every caller instead of leaving them waiting."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from engine import LLM, CheckpointError, InvalidRequestError, SamplingParams
from engine.engine_stats import EngineStats
from engine.llm_engine import EngineConfig
from engine.outputs import RequestOutput
from server.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from tests.conftest import copy_checkpoint

PROMPTS = [f"Prompt number {i} says" for i in range(24)]
SMALL = {"kv_cache_memory_bytes": 32 << 20}


def start(model: Path, max_num_seqs: int = 8, max_queue: int = 64) -> AsyncEngine:
    return AsyncEngine(model, EngineConfig(max_num_seqs=max_num_seqs, **SMALL), max_queue, threads=1)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def async_engine(tiny_model: Path) -> Iterator[AsyncEngine]:
    engine = start(tiny_model)
    yield engine
    engine.shutdown(timeout=30)


class StepCounter:
    """An observer that records how many requests advanced in each step."""

    def __init__(self) -> None:
        self.outputs_per_step: list[int] = []

    def on_step(self, stats: EngineStats, outputs: list[RequestOutput]) -> None:
        self.outputs_per_step.append(len(outputs))

    def on_abort(self, request_id: str, num_sequences: int) -> None:
        pass

    def on_idle(self, stats: EngineStats) -> None:
        pass


async def collect(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async for output in stream:
        last = output
    assert last is not None and last.finished
    return last


def wait_idle(engine: AsyncEngine, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.stats.num_requests or engine.stats.kv_cache_usage or engine.num_sequences:
        assert time.monotonic() < deadline, f"not idle: {engine.stats}"
        time.sleep(0.01)


def test_concurrent_streams_get_the_offline_answers(async_engine: AsyncEngine, tiny_model: Path) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(str(tiny_model)).generate(PROMPTS, params)]
    steps = StepCounter()
    async_engine.observers.append(steps)

    async def run() -> list[RequestOutput]:
        return await asyncio.gather(
            *(collect(async_engine.generate(f"r{i}", p, params)) for i, p in enumerate(PROMPTS))
        )

    try:
        results = asyncio.run(run())
    finally:
        async_engine.observers.remove(steps)
    assert [r.outputs[0].token_ids for r in results] == expected
    assert max(steps.outputs_per_step) == 8  # batched up to max_num_seqs, not served one by one
    wait_idle(async_engine)


def test_closing_or_cancelling_a_stream_aborts_the_request(async_engine: AsyncEngine) -> None:
    async def run() -> None:
        stream = async_engine.generate("gone", "A long answer", SamplingParams(max_tokens=300, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()
        streaming = asyncio.Event()

        async def read_all() -> None:
            async for _ in async_engine.generate("c", "x", SamplingParams(max_tokens=300, ignore_eos=True)):
                streaming.set()

        task = asyncio.create_task(read_all())
        await streaming.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert async_engine.num_sequences == 0
    wait_idle(async_engine, timeout=2.0)  # long before 300 tokens could have been generated


def test_invalid_request_fails_before_streaming(async_engine: AsyncEngine) -> None:
    async def run() -> None:
        with pytest.raises(InvalidRequestError, match="maximum context length"):
            await collect(async_engine.generate("big", "x", SamplingParams(max_tokens=10**6)))

    asyncio.run(run())
    assert async_engine.num_sequences == 0


def test_a_reader_that_falls_behind_gets_the_newest_output_only(async_engine: AsyncEngine) -> None:
    async def run() -> list[RequestOutput]:
        stream = async_engine.generate("slow", "A tale", SamplingParams(max_tokens=40, ignore_eos=True))
        first = await anext(stream)
        while async_engine.num_sequences:  # the engine finishes while nobody reads
            await asyncio.sleep(0.01)
        return [first] + [output async for output in stream]

    first, *rest = asyncio.run(run())
    assert len(rest) == 1 and rest[0].finished and len(rest[0].outputs[0].token_ids) == 40
    first_ids = first.outputs[0].token_ids  # one token, or more when this reader started late
    assert first_ids and rest[0].outputs[0].token_ids[: len(first_ids)] == first_ids


def test_queue_bound_counts_sequences_and_refuses_extra_requests(tiny_model: Path) -> None:
    engine = start(tiny_model, max_num_seqs=2, max_queue=1)
    long = SamplingParams(max_tokens=400, ignore_eos=True)  # still running when the last one arrives

    async def run() -> None:
        tasks = [asyncio.create_task(collect(engine.generate("one", "x", long)))]
        tasks.append(
            asyncio.create_task(collect(engine.generate("pair", "x", SamplingParams(**{**vars(long), "n": 2}))))
        )
        while engine.num_sequences < 3:  # two running, one waiting
            await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError, match="waiting queue is full"):
            await anext(engine.generate("refused", "x", long))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        asyncio.run(run())
        wait_idle(engine)
    finally:
        engine.shutdown(timeout=30)


def test_shutdown_finishes_short_requests_and_aborts_long_ones(tiny_model: Path) -> None:
    engine = start(tiny_model, max_num_seqs=4)

    async def run() -> list[RequestOutput | BaseException]:
        long = asyncio.create_task(
            collect(engine.generate("long", "x", SamplingParams(max_tokens=1800, ignore_eos=True)))
        )
        while engine.num_sequences < 1:
            await asyncio.sleep(0.01)
        admitted = asyncio.Event()

        async def short_request() -> RequestOutput:
            stream = engine.generate("short", "x", SamplingParams(max_tokens=3, ignore_eos=True))
            last = await anext(stream)
            admitted.set()
            async for last in stream:
                pass
            return last

        short = asyncio.create_task(short_request())
        await admitted.wait()  # the short request runs before shutdown begins
        await asyncio.to_thread(engine.shutdown, 0.5, 30)
        with pytest.raises(QueueFullError, match="shutting down"):
            await anext(engine.generate("late", "x", SamplingParams()))
        return await asyncio.gather(short, long, return_exceptions=True)

    short, long = asyncio.run(run())
    assert isinstance(short, RequestOutput) and len(short.outputs[0].token_ids) == 3
    assert isinstance(long, QueueFullError)
    assert engine.num_sequences == 0 and not engine.is_alive


def test_a_killed_engine_process_fails_every_caller(tiny_model: Path) -> None:
    engine = start(tiny_model, max_num_seqs=4)

    async def run() -> None:
        stream = engine.generate("doomed", "x", SamplingParams(max_tokens=1800, ignore_eos=True))
        await anext(stream)
        os.kill(engine.info.pid, signal.SIGKILL)  # a real fault: the process is gone
        with pytest.raises(EngineDeadError, match="exited"):
            await asyncio.wait_for(collect(stream), timeout=10)
        with pytest.raises(EngineDeadError):
            await anext(engine.generate("later", "x", SamplingParams()))
        await asyncio.wait_for(engine.refresh(), timeout=5)  # returns instead of waiting forever

    try:
        asyncio.run(run())
        assert engine.num_sequences == 0 and not engine.is_alive
    finally:
        engine.shutdown(timeout=10)


def test_a_bad_checkpoint_fails_the_constructor_with_the_engines_message(tmp_path: Path, tiny_model: Path) -> None:
    broken = copy_checkpoint(tiny_model, tmp_path / "broken")
    (broken / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        start(broken)


def test_a_long_engine_call_keeps_sending_heartbeats() -> None:
    from multiprocessing import Pipe

    from server.engine_messages import HEARTBEAT_INTERVAL_S, Heartbeat
    from server.engine_process import _heartbeats

    receiver, sender = Pipe(duplex=False)
    with _heartbeats(sender):
        time.sleep(4.5 * HEARTBEAT_INTERVAL_S)  # a switch that recompiles the step
    beats = []
    while receiver.poll():
        beats.append(receiver.recv())
    assert len(beats) >= 3 and all(isinstance(beat, Heartbeat) for beat in beats)
    time.sleep(2 * HEARTBEAT_INTERVAL_S)
    assert not receiver.poll()  # stopped with the call
