"""The engine thread behind the server: concurrent streams batch together, disconnects abort at once, bad
requests fail before streaming, and the queue bound refuses work instead of growing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.llm_engine import EngineConfig, LLMEngine
from engine.outputs import RequestOutput
from server.async_engine import AsyncEngine, EngineDeadError, QueueFullError

PROMPTS = [f"Prompt number {i} says" for i in range(24)]


@pytest.fixture
def async_engine(tiny_model: Path) -> Iterator[AsyncEngine]:
    engine = AsyncEngine(LLMEngine(tiny_model, EngineConfig(max_num_seqs=8)), max_queue=64)
    yield engine
    engine.shutdown(timeout=30)


class StepCounter:
    """An observer that records how many requests advanced in each step."""

    def __init__(self) -> None:
        self.outputs_per_step: list[int] = []

    def on_step(self, engine: LLMEngine, outputs: list[RequestOutput]) -> None:
        self.outputs_per_step.append(len(outputs))

    def on_abort(self, engine: LLMEngine, request_id: str, num_completions: int) -> None:
        pass

    def on_idle(self, engine: LLMEngine) -> None:
        pass


async def collect(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async for output in stream:
        last = output
    assert last is not None and last.finished
    return last


def test_concurrent_streams_get_the_offline_answers(async_engine: AsyncEngine, tiny_model: Path) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(str(tiny_model)).generate(PROMPTS, params)]
    steps = StepCounter()
    async_engine.observers.append(steps)

    async def run() -> list[RequestOutput]:
        return await asyncio.gather(
            *(collect(async_engine.generate(f"r{i}", p, params)) for i, p in enumerate(PROMPTS))
        )

    results = asyncio.run(run())
    assert [r.outputs[0].token_ids for r in results] == expected
    assert max(steps.outputs_per_step) == 8  # batched up to max_num_seqs, not served one by one
    assert async_engine.num_sequences == 0 and not async_engine.engine.has_unfinished_requests()


def test_closing_a_stream_aborts_the_request_and_frees_its_blocks(async_engine: AsyncEngine) -> None:
    engine = async_engine.engine
    free_before = engine.block_manager.num_free_blocks

    async def run() -> None:
        stream = async_engine.generate("gone", "A long answer", SamplingParams(max_tokens=200, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()
        assert await async_engine.call(lambda e: (e.has_unfinished_requests(), len(e.requests))) == (False, 0)

    asyncio.run(run())
    assert async_engine.num_sequences == 0
    assert engine.block_manager.num_free_blocks == free_before


def test_cancelled_request_is_aborted(async_engine: AsyncEngine) -> None:
    async def run() -> None:
        task = asyncio.create_task(
            collect(async_engine.generate("c", "x", SamplingParams(max_tokens=300, ignore_eos=True)))
        )
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await async_engine.call(lambda e: len(e.requests)) == 0

    asyncio.run(run())
    assert async_engine.num_sequences == 0


def test_invalid_request_fails_before_streaming(async_engine: AsyncEngine) -> None:
    async def run() -> None:
        with pytest.raises(ValueError, match="maximum context length"):
            await collect(async_engine.generate("big", "x", SamplingParams(max_tokens=10**6)))

    asyncio.run(run())
    assert async_engine.num_sequences == 0


def test_queue_bound_refuses_extra_requests(tiny_model: Path) -> None:
    engine = AsyncEngine(LLMEngine(tiny_model, EngineConfig(max_num_seqs=2)), max_queue=1)
    params = SamplingParams(max_tokens=1500, ignore_eos=True)  # still running when the fourth arrives

    async def run() -> None:
        tasks = [asyncio.create_task(collect(engine.generate(f"q{i}", "x", params))) for i in range(3)]
        while engine.num_sequences < 3:  # two running, one waiting
            await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError, match="waiting queue is full"):
            await anext(engine.generate("q3", "x", params))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert await engine.call(lambda e: len(e.requests)) == 0

    try:
        asyncio.run(run())
        assert engine.num_sequences == 0
    finally:
        engine.shutdown(timeout=30)


def test_shutdown_finishes_short_requests_and_aborts_long_ones(tiny_model: Path) -> None:
    engine = AsyncEngine(LLMEngine(tiny_model, EngineConfig(max_num_seqs=4)))

    async def run() -> list[RequestOutput | BaseException]:
        long = asyncio.create_task(
            collect(engine.generate("long", "x", SamplingParams(max_tokens=1800, ignore_eos=True)))
        )
        while engine.num_sequences < 1:
            await asyncio.sleep(0.01)
        short = asyncio.create_task(
            collect(engine.generate("short", "x", SamplingParams(max_tokens=3, ignore_eos=True)))
        )
        await asyncio.sleep(0)  # the short request is admitted before shutdown begins
        await asyncio.to_thread(engine.shutdown, 0.5, 30)
        with pytest.raises(QueueFullError, match="shutting down"):
            await anext(engine.generate("late", "x", SamplingParams()))
        return await asyncio.gather(short, long, return_exceptions=True)

    short, long = asyncio.run(run())
    assert isinstance(short, RequestOutput) and len(short.outputs[0].token_ids) == 3
    assert isinstance(long, QueueFullError)
    assert engine.num_sequences == 0 and not engine.engine.has_unfinished_requests()


def test_a_reader_that_falls_behind_gets_the_newest_output_only(async_engine: AsyncEngine) -> None:
    async def run() -> list[RequestOutput]:
        stream = async_engine.generate("slow", "A tale", SamplingParams(max_tokens=40, ignore_eos=True))
        first = await anext(stream)
        while async_engine.num_sequences:  # the engine finishes while nobody reads
            await asyncio.sleep(0.01)
        return [first] + [output async for output in stream]

    first, *rest = asyncio.run(run())
    assert len(rest) == 1 and rest[0].finished and len(rest[0].outputs[0].token_ids) == 40
    assert rest[0].outputs[0].token_ids[:1] == first.outputs[0].token_ids


def test_a_failed_engine_refuses_work_instead_of_hanging(tiny_model: Path) -> None:
    llm_engine = LLMEngine(tiny_model, EngineConfig(max_num_seqs=4))

    def device_fault(*_: object) -> None:
        raise RuntimeError("simulated device fault")

    llm_engine.runner.execute = device_fault  # type: ignore[method-assign]  # fault injection
    engine = AsyncEngine(llm_engine)

    async def run() -> None:
        with pytest.raises(EngineDeadError, match="simulated device fault"):
            await collect(engine.generate("doomed", "x", SamplingParams(max_tokens=4)))
        while engine.is_alive:
            await asyncio.sleep(0.01)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(engine.call(lambda e: len(e.requests)), timeout=5)
        with pytest.raises(EngineDeadError):
            await anext(engine.generate("later", "x", SamplingParams()))

    asyncio.run(run())
    assert engine.num_sequences == 0
