"""The HTTP process's handle on the engine process, with one asyncio stream per request.

The engine runs in its own process (server/engine_process.py), so model work never competes with the
event loop for a GIL. Requests and aborts are sent over a pipe; a reader thread receives each step's
outputs and hands them to the waiting coroutines with one `call_soon_threadsafe` per step, then to the
observers (metrics). Admission (the queue bound) is decided here, before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from engine.config import CheckpointError, ModelConfig
from engine.llm_engine import EngineConfig
from engine.outputs import RequestOutput
from engine.sampling_params import InvalidRequestError, SamplingParams
from engine.tokenizer import Tokenizer
from server.engine_process import EngineInfo, EngineStats, run_engine

logger = logging.getLogger(__name__)
LOAD_ERRORS: dict[str, type[Exception]] = {"CheckpointError": CheckpointError, "ValueError": ValueError}


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later (HTTP 503)."""


class EngineDeadError(RuntimeError):
    """The engine process stopped; no request can be served."""


class EngineObserver(Protocol):
    """Sees the engine's progress (metrics): after every step, on every abort, and when it goes idle.

    Calls run on the reader thread; they must be quick and must not block.
    """

    def on_step(self, stats: EngineStats, outputs: list[RequestOutput]) -> None: ...

    def on_abort(self, request_id: str, num_sequences: int) -> None: ...

    def on_idle(self, stats: EngineStats) -> None: ...


@dataclass
class _Stream:
    """A request's link back to its coroutine: only the newest output is kept (outputs are cumulative), so a
    client that stops reading costs one output, not one per step."""

    loop: asyncio.AbstractEventLoop
    num_sequences: int
    added: asyncio.Future[None]
    latest: RequestOutput | None = None
    error: BaseException | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, item: RequestOutput | BaseException) -> None:
        """Runs in the stream's event loop."""
        if isinstance(item, BaseException):
            self.error = item
            if not self.added.done():
                self.added.set_exception(item)
        else:
            self.latest = item
        self.changed.set()

    async def next(self) -> RequestOutput:
        while True:
            if self.latest is not None:
                item, self.latest = self.latest, None
                return item
            if self.error is not None:
                raise self.error
            self.changed.clear()
            await self.changed.wait()


class AsyncEngine:
    """Serves many concurrent `generate` calls from one continuously batching engine in its own process.

    The constructor starts the process and returns once the model is loaded (raising CheckpointError or
    ValueError, with the engine's message, if it cannot be); `ready` is set once warm-up has run. max_queue
    bounds the sequences (a request with n has n) admitted beyond a full batch; past it `generate` raises
    QueueFullError.
    """

    def __init__(
        self,
        model: str | Path,
        config: EngineConfig | None = None,
        max_queue: int = 256,
        warmup: bool = True,
        threads: int | None = None,
        expert_read_every_steps: int = 16,
        load_timeout: float = 600.0,
    ) -> None:
        self.config = config = config or EngineConfig()
        self.max_queue = max_queue
        self.observers: list[EngineObserver] = []
        self.ready = threading.Event()
        self.error: str | None = None
        self.stats = EngineStats(0, 0, 0, 0, 0.0, 0)
        self._lock = threading.Lock()  # guards the maps and counters below, and the pipe's sending end
        self._streams: dict[str, _Stream] = {}
        self._admitted = 0  # sequences accepted and not yet finished or aborted
        self._stopping = False
        self._queries: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[EngineStats | None]]] = {}
        self._next_query = 0
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self._conn, child = context.Pipe()
        args = (child, str(model), config, warmup, threads, expert_read_every_steps)
        self._process = context.Process(target=run_engine, args=args, name="moe-serve-engine", daemon=True)
        self._process.start()
        child.close()
        self.info = self._wait_loaded(load_timeout)
        # What the HTTP side needs of the model, read here too (small files, no weights).
        self.model_config = ModelConfig.from_dir(Path(model))
        self.tokenizer = Tokenizer(Path(model), self.model_config.eos_token_ids)
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._reader.start()

    def _wait_loaded(self, timeout: float) -> EngineInfo:
        if not self._conn.poll(timeout):
            self._process.kill()
            raise RuntimeError(f"the engine process did not load the model within {timeout:g} s")
        try:
            message = self._conn.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(f"the engine process exited with status {self._process.exitcode}") from None
        if message[0] == "failed":
            self._process.join()
            _, kind, text = message
            raise LOAD_ERRORS.get(kind, RuntimeError)(text)
        return message[1]

    # ----- called from the event loop -----

    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        """Add a request and yield its latest state after steps that advanced it, the last one finished (a
        consumer slower than the engine gets fewer, later states; outputs are cumulative, so nothing is lost).

        Raises InvalidRequestError or QueueFullError before yielding anything. Closing the iterator early (a
        disconnected client) aborts the request in the engine at once.
        """
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, params.n, loop.create_future())
        with self._lock:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            if self.error is not None:
                raise EngineDeadError(f"the engine stopped: {self.error}")
            if request_id in self._streams:
                raise InvalidRequestError(f"request_id {request_id!r} is already in use")
            if self._admitted - self.config.max_num_seqs >= self.max_queue:
                raise QueueFullError(f"the waiting queue is full ({self.max_queue} sequences)")
            self._admitted += params.n
            self._streams[request_id] = stream  # before sending: the reply can arrive at once
            try:
                self._conn.send(("add", request_id, prompt, params))
            except (OSError, ValueError) as exc:
                del self._streams[request_id]
                self._admitted -= params.n
                raise EngineDeadError(f"the engine process is gone: {exc!r}") from exc
        finished = False
        try:
            await stream.added  # inside the try: a caller cancelled while the add is in flight still aborts it
            while not finished:
                item = await stream.next()
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; unknown or finished ids are ignored."""
        stream = self._forget(request_id)
        if stream is None:
            return
        self._send(("abort", request_id))
        for observer in self.observers:
            observer.on_abort(request_id, stream.num_sequences)

    async def refresh(self) -> None:
        """Have an idle engine report exact figures (expert counts, gauges) to the observers now; a busy
        engine's are at most a few steps old already."""
        if self.error is not None or not self.ready.is_set():
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[EngineStats | None] = loop.create_future()
        with self._lock:
            query = self._next_query
            self._next_query += 1
            self._queries[query] = (loop, future)
        if not self._send(("refresh", query)):
            return
        await future

    @property
    def num_sequences(self) -> int:
        """Sequences of requests accepted and not yet finished."""
        return self._admitted

    @property
    def is_alive(self) -> bool:
        """The engine process runs and has not failed."""
        return self.error is None and self._process.is_alive()

    def shutdown(self, grace: float = 0.0, timeout: float | None = None) -> None:
        """Refuse new requests, let those in flight finish for up to `grace` seconds, abort the rest (their
        streams end with QueueFullError), and stop the engine process."""
        with self._lock:
            self._stopping = True
        deadline = time.monotonic() + grace
        while self._admitted and time.monotonic() < deadline and self.is_alive:
            time.sleep(0.01)
        for request_id in list(self._streams):
            stream = self._forget(request_id)
            if stream is not None:
                _call_in_loop(stream.loop, stream.offer, QueueFullError("the server is shutting down"))
        self._send(("abort_all",))
        self._send(("exit",))
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    # ----- both threads -----

    def _send(self, message: tuple[Any, ...]) -> bool:
        with self._lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError):
                return False
        return True

    def _forget(self, request_id: str) -> _Stream | None:
        """Drop a request's stream and release its sequences from the queue bound (exactly once)."""
        with self._lock:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                self._admitted -= stream.num_sequences
        return stream

    # ----- the reader thread -----

    def _read(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                kind = message[0]
                if kind == "step":
                    self._on_step(message[1], message[2])
                elif kind == "added":
                    self._on_added(message[1], message[2])
                elif kind == "idle":
                    self.stats = message[1]
                    for observer in self.observers:
                        observer.on_idle(message[1])
                elif kind == "refreshed":
                    self._on_refreshed(message[1], message[2])
                elif kind == "ready":
                    self.ready.set()
                elif kind == "dead":
                    self._die(message[1])
                    return
        except (EOFError, OSError):
            self._process.join(5)
            self._die(f"the engine process exited with status {self._process.exitcode}")

    def _on_step(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        """Hand a step's outputs to their streams with one wake-up per event loop; observers see the outputs
        of live requests only (an aborted request's last step is not counted again)."""
        self.stats = stats
        live = []
        batches: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        for output in outputs:
            stream = self._forget(output.request_id) if output.finished else self._streams.get(output.request_id)
            if stream is None:
                continue
            live.append(output)
            batches.setdefault(stream.loop, []).append((stream, output))
        for loop, batch in batches.items():
            if not _call_in_loop(loop, _offer_all, batch):
                for _, output in batch:
                    self.abort(output.request_id)
        for observer in self.observers:
            observer.on_step(stats, live)

    def _on_added(self, request_id: str, error: tuple[str, str] | None) -> None:
        if error is None:
            stream = self._streams.get(request_id)
            if stream is not None:
                _call_in_loop(stream.loop, _settle, stream.added, None)
            return
        stream = self._forget(request_id)
        if stream is not None:
            kind, text = error
            exc = InvalidRequestError(text) if kind == "invalid" else RuntimeError(text)
            _call_in_loop(stream.loop, _settle, stream.added, exc)

    def _on_refreshed(self, query: int, stats: EngineStats | None) -> None:
        with self._lock:
            loop, future = self._queries.pop(query)
        if stats is not None:
            self.stats = stats
            for observer in self.observers:
                observer.on_idle(stats)
        _call_in_loop(loop, _settle, future, None, stats)

    def _die(self, reason: str) -> None:
        """Fail every live stream and waiting query; later calls raise EngineDeadError."""
        if not self._stopping:
            logger.error("engine stopped: %s", reason)
        with self._lock:
            self.error = reason
            streams, self._streams = self._streams, {}
            queries, self._queries = self._queries, {}
            self._admitted = 0
        for stream in streams.values():
            _call_in_loop(stream.loop, stream.offer, EngineDeadError(f"the engine stopped: {reason}"))
        for loop, future in queries.values():
            _call_in_loop(loop, _settle, future, None, None)


def _call_in_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> bool:
    """Schedule fn(*args) on loop from another thread; False if the loop has closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        return False
    return True


def _offer_all(batch: list[tuple[_Stream, RequestOutput]]) -> None:
    for stream, output in batch:
        stream.offer(output)


def _settle(future: asyncio.Future[Any], exc: BaseException | None, value: Any = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)
