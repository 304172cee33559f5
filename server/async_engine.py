"""The HTTP process's handle on the engine process, with one asyncio stream per request.

The engine runs in its own process (server/engine_process.py), so model work never competes with the
event loop for a GIL. Typed messages (server/engine_messages.py) go over a pipe: a writer thread sends
requests and aborts, a reader thread receives each step's output deltas, rebuilds the cumulative outputs and
hands them to the waiting coroutines with one `call_soon_threadsafe` per step, then to the observers
(metrics). Admission (the bound on admitted sequences) is decided here, for a whole request at once, before
anything is sent. The reader notes when it last heard from the engine, which is how /health tells a frozen
engine from a quiet one; an engine that dies unasked calls the `on_death` hooks (the server then exits).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from engine.config import CheckpointError, ModelConfig
from engine.llm_engine import EngineConfig
from engine.outputs import RequestOutput
from engine.routing import RoutingPolicy
from engine.sampling_params import InvalidRequestError, RequestOutputKind, SamplingParams
from engine.token_routing import TokenRouting
from engine.tokenizer import ModelTokenizer
from server.engine_messages import (
    AbortAll,
    AbortRequest,
    Added,
    AddRequest,
    Dead,
    EngineInfo,
    EngineStats,
    Exit,
    FromEngine,
    Heartbeat,
    Idle,
    Loaded,
    LoadFailed,
    Ready,
    Refresh,
    Refreshed,
    RoutingSet,
    SetRouting,
    StepDone,
    ToEngine,
)
from server.engine_start import EngineProcess
from server.output_delta import apply_delta

logger = logging.getLogger(__name__)
LOAD_ERRORS: dict[str, type[Exception]] = {"CheckpointError": CheckpointError, "ValueError": ValueError}
REFRESH_TIMEOUT_S = 10.0


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


@dataclass(frozen=True)
class EngineHealth:
    """What /health reports: healthy while the engine process runs and has been heard from recently."""

    healthy: bool
    status: str
    seconds_since_heard: float


@dataclass
class _Stream:
    """A request's link back to its coroutine: only the newest output is kept (outputs are cumulative), so a
    client that stops reading costs one output, not one per step."""

    loop: asyncio.AbstractEventLoop
    num_sequences: int
    added: asyncio.Future[None]
    prompt_text: str | None = None
    latest: RequestOutput | None = None
    error: BaseException | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    built: RequestOutput | None = None  # the cumulative output the reader thread rebuilt last

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


class RequestStream:
    """One engine request's outputs as an async iterator: its latest state after steps that advanced it, the
    last one finished (a consumer slower than the engine gets fewer, later states; outputs are cumulative).

    The request is already admitted and sent. Leaving early (aclose, an exception or a cancellation while
    waiting) aborts it in the engine at once.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, stream: _Stream) -> None:
        self.request_id = request_id
        self._engine = engine
        self._stream = stream
        self._added = False
        self._done = False
        self.latest: RequestOutput | None = None  # the last output read

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            if not self._added:
                await self._stream.added
                self._added = True
            output = await self._stream.next()
        except BaseException:
            await self.aclose()
            raise
        self._done = output.finished
        self.latest = output
        return output

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._engine.abort(self.request_id)


class AsyncEngine:
    """Serves many concurrent requests from one continuously batching engine in its own process.

    The constructor starts the process (or runs the one given, started earlier: server/engine_start.py) and
    returns once the model is loaded (raising CheckpointError or ValueError, with the engine's message, if it
    cannot be); `ready` is set once warm-up has run. At most
    `capacity` sequences (a request with n has n per prompt) are admitted at once: max_num_seqs in the batch
    plus max_queue waiting. A request that needs more than that can never run (InvalidRequestError); one that
    does not fit now gets QueueFullError.
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
        heartbeat_timeout: float = 10.0,
        ranks_from_launcher: bool = False,
        process: EngineProcess | None = None,
    ) -> None:
        self.config = config = config or EngineConfig()
        self.max_queue = max_queue
        self.heartbeat_timeout = heartbeat_timeout
        self.observers: list[EngineObserver] = []
        self.on_death: list[Callable[[str], None]] = []  # called (reader thread) when the engine dies unasked
        self.ready = threading.Event()
        self.error: str | None = None
        self.failed = False  # the engine died without being told to stop
        self.stats = EngineStats()
        self._lock = threading.Lock()  # guards the maps and counters below (never held during pipe I/O)
        # Observers see a request's outputs and its abort in order, never an output after its abort.
        self._observe_lock = threading.RLock()
        self._outbox: queue.SimpleQueue[ToEngine | None] = queue.SimpleQueue()  # the writer's only input
        self._streams: dict[str, _Stream] = {}
        self._admitted = 0  # sequences accepted and not yet finished or aborted
        self._stopping = False
        # Answers awaited from the engine (Refreshed, RoutingSet), by query number.
        self._queries: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = {}
        self._next_query = 0
        self._last_heard = time.monotonic()
        self._handlers: dict[type, Callable[[Any], None]] = {
            StepDone: self._on_step,
            Added: self._on_added,
            Idle: self._on_idle,
            Refreshed: self._on_refreshed,
            RoutingSet: self._on_routing_set,
            Heartbeat: lambda _: None,
            Ready: self._on_ready,
        }
        self.compile_seconds = self.warmup_seconds = 0.0
        started = process or EngineProcess()
        self._conn, self._process = started.conn, started.process
        log_level = logging.getLogger().getEffectiveLevel()
        arguments = (
            str(model),
            config,
            warmup,
            threads,
            expert_read_every_steps,
            os.getpid(),
            log_level,
            ranks_from_launcher,
        )
        started.run(*arguments)
        try:
            self.info = self._wait_loaded(load_timeout)
            # What the HTTP side needs of the model, read here too (small files, no weights).
            self.model_config = ModelConfig.from_dir(Path(model))
            self.tokenizer = ModelTokenizer(Path(model), self.model_config.eos_token_ids)
        except BaseException:
            self._process.kill()
            self._process.join()
            raise
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._writer = threading.Thread(target=self._write, name="engine-writer", daemon=True)
        self._reader.start()
        self._writer.start()

    def _wait_loaded(self, timeout: float) -> EngineInfo:
        if not self._conn.poll(timeout):
            raise RuntimeError(f"the engine process did not load the model within {timeout:g} s")
        try:
            message = self._conn.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(f"the engine process exited with status {self._process.exitcode}") from None
        if isinstance(message, LoadFailed):
            self._process.join()
            raise LOAD_ERRORS.get(message.kind, RuntimeError)(message.message)
        assert isinstance(message, Loaded), f"unexpected first message {message!r}"
        return message.info

    @property
    def capacity(self) -> int:
        """Sequences that can be admitted at once: a full batch plus the waiting queue."""
        return self.config.max_num_seqs + self.max_queue

    # ----- called from the event loop -----

    def submit(
        self,
        request_id: str,
        prompts: list[list[int]],
        params: SamplingParams,
        prompt_texts: list[str | None] | None = None,
    ) -> list[RequestStream]:
        """Admit a request of one or more tokenized prompts (n sequences each) whole or not at all, send it to
        the engine, and return one stream per prompt (request ids `request_id-i` when there are several).

        Raises InvalidRequestError if the request can never fit, QueueFullError if it does not fit now,
        EngineDeadError if the engine has stopped.
        """
        loop = asyncio.get_running_loop()
        total = params.n * len(prompts)
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        texts = prompt_texts or [None] * len(prompts)
        streams = [_Stream(loop, params.n, loop.create_future(), text) for text in texts]
        with self._lock:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            if self.error is not None:
                raise EngineDeadError(f"the engine stopped: {self.error}")
            if total > self.capacity:
                raise InvalidRequestError(
                    f"the request needs {total} sequences ({len(prompts)} prompts x n={params.n}), more than this "
                    f"server can ever hold at once ({self.capacity}: max_num_seqs {self.config.max_num_seqs} + "
                    f"max_queue {self.max_queue})"
                )
            if self._admitted + total > self.capacity:
                raise QueueFullError(
                    f"the waiting queue is full ({self._admitted} of {self.capacity} sequences admitted, "
                    f"this request needs {total})"
                )
            taken = next((i for i in ids if i in self._streams), None)
            if taken is not None:
                raise InvalidRequestError(f"request_id {taken!r} is already in use")
            self._admitted += total
            self._streams.update(zip(ids, streams))  # before sending: the reply can arrive at once
        delta = replace(params, output_kind=RequestOutputKind.DELTA)  # what the engine process sends
        for sub_id, prompt in zip(ids, prompts):
            self._outbox.put(AddRequest(sub_id, prompt, delta))
        return [RequestStream(self, sub_id, stream) for sub_id, stream in zip(ids, streams)]

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt_text: str | None = None
    ) -> RequestStream:
        """submit() for one prompt."""
        return self.submit(request_id, [prompt_token_ids], params, [prompt_text])[0]

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; unknown or finished ids are ignored."""
        with self._observe_lock:
            stream = self._forget(request_id)
            if stream is None:
                return
            self._notify("on_abort", request_id, stream.num_sequences)
        self._outbox.put(AbortRequest(request_id))

    async def refresh(self) -> None:
        """Have an idle engine report exact figures (expert counts, gauges) to the observers now; a busy
        engine's are at most a few steps old already."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[EngineStats | None] = loop.create_future()
        with self._lock:
            if self.error is not None or self._stopping or not self.ready.is_set():
                return
            query = self._next_query
            self._next_query += 1
            self._queries[query] = (loop, future)
        self._outbox.put(Refresh(query))
        try:
            await asyncio.wait_for(future, REFRESH_TIMEOUT_S)
        except TimeoutError:
            with self._lock:
                self._queries.pop(query, None)

    async def set_routing(self, routing: TokenRouting, pruning: dict[int, RoutingPolicy] | None = None) -> None:
        """Make `routing` the default budget (and `pruning` the live pruning, if given) from the engine's next
        step on; ValueError (the engine's reason) if it refused, EngineDeadError if it is gone."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str | None] = loop.create_future()
        with self._lock:
            if self.error is not None:
                raise EngineDeadError(f"the engine stopped: {self.error}")
            query = self._next_query
            self._next_query += 1
            self._queries[query] = (loop, future)
        self._outbox.put(SetRouting(query, routing, pruning))
        error = await future
        if error is not None:
            raise ValueError(error)
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped: {self.error}")

    def _on_routing_set(self, message: RoutingSet) -> None:
        with self._lock:
            waiting = self._queries.pop(message.query, None)
        if waiting is not None:
            _call_in_loop(waiting[0], _settle, waiting[1], None, message.error)

    @property
    def num_sequences(self) -> int:
        """Sequences of requests accepted and not yet finished."""
        return self._admitted

    @property
    def is_alive(self) -> bool:
        """The engine process runs and has not failed."""
        return self.error is None and self._process.is_alive()

    def health(self) -> EngineHealth:
        """Answered from this process at once: the engine's liveness, and how long ago it was last heard from
        (a loaded engine that is silent for longer than heartbeat_timeout is frozen or stuck)."""
        silent = time.monotonic() - self._last_heard
        if not self.is_alive:
            return EngineHealth(False, f"engine stopped: {self.error or 'the process exited'}", silent)
        if self.ready.is_set() and silent > self.heartbeat_timeout:
            return EngineHealth(False, f"engine unresponsive: not heard from for {silent:.1f} s", silent)
        return EngineHealth(True, "ok" if self.ready.is_set() else "loading", silent)

    def shutdown(self, grace: float = 0.0, timeout: float | None = None) -> None:
        """Refuse new requests, let those in flight finish for up to `grace` seconds, abort the rest (their
        streams end with QueueFullError), and stop the engine process."""
        with self._lock:
            self._stopping = True
        deadline = time.monotonic() + grace
        while self._admitted and time.monotonic() < deadline and self.is_alive:
            time.sleep(0.01)
        self._fail_all(QueueFullError("the server is shutting down"))
        self._outbox.put(AbortAll())
        self._outbox.put(Exit())
        self._outbox.put(None)
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    # ----- both threads -----

    def _write(self) -> None:
        """The only thread that sends on the pipe, so neither the event loop nor the reader ever blocks on it
        (a full pipe in both directions cannot deadlock)."""
        while (message := self._outbox.get()) is not None:
            try:
                self._conn.send(message)
            except (OSError, ValueError):
                return  # the engine is gone; the reader reports it

    def _notify(self, event: str, *args: Any) -> None:
        """Call every observer; a failing observer is logged, never allowed to stop serving."""
        for observer in self.observers:
            try:
                getattr(observer, event)(*args)
            except Exception:
                logger.exception("engine observer %r failed in %s", observer, event)

    def _fail_all(self, exc: BaseException) -> None:
        """End every live stream with exc (observers see them aborted)."""
        with self._observe_lock:
            for request_id in list(self._streams):
                stream = self._forget(request_id)
                if stream is not None:
                    self._notify("on_abort", request_id, stream.num_sequences)
                    _call_in_loop(stream.loop, stream.offer, exc)

    def _forget(self, request_id: str) -> _Stream | None:
        """Drop a request's stream and release its sequences from the admission bound (exactly once)."""
        with self._lock:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                self._admitted -= stream.num_sequences
        return stream

    # ----- the reader thread -----

    def _read(self) -> None:
        try:
            while True:
                message: FromEngine = self._conn.recv()
                self._last_heard = time.monotonic()
                if isinstance(message, Dead):
                    self._die(message.message)
                    return
                self._handlers[type(message)](message)
        except (EOFError, OSError):
            self._process.join(5)
            self._die(f"the engine process exited with status {self._process.exitcode}")
        except BaseException as exc:  # never leave callers waiting on a reader that is gone
            logger.exception("engine reader failed")
            self._process.kill()
            self._die(f"the engine reader failed: {exc!r}")

    def _on_step(self, message: StepDone) -> None:
        """Hand a step's outputs to their streams with one wake-up per event loop. Observers see the outputs of
        live requests only, before any abort of them can be observed (an aborted request is not counted again)."""
        self.stats = message.stats
        orphaned = []
        with self._observe_lock:
            live = []
            batches: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
            for delta in message.deltas:
                finished = delta.finished
                stream = self._forget(delta.request_id) if finished else self._streams.get(delta.request_id)
                if stream is None:
                    continue
                if stream.loop.is_closed() and not finished:
                    orphaned.append(delta.request_id)
                    continue
                output = apply_delta(stream.built, delta)
                if stream.built is None and stream.prompt_text is not None:
                    output.prompt = stream.prompt_text  # later outputs copy it
                stream.built = output
                live.append(output)
                batches.setdefault(stream.loop, []).append((stream, output))
            self._notify("on_step", message.stats, live)
        for loop, batch in batches.items():
            if not _call_in_loop(loop, _offer_all, batch):
                orphaned += [output.request_id for _, output in batch]
        for request_id in orphaned:
            self.abort(request_id)

    def _on_added(self, message: Added) -> None:
        if message.error is None:
            stream = self._streams.get(message.request_id)
            if stream is not None:
                _call_in_loop(stream.loop, _settle, stream.added, None)
            return
        stream = self._forget(message.request_id)
        if stream is not None:
            kind, text = message.error
            exc = InvalidRequestError(text) if kind == "invalid" else RuntimeError(text)
            _call_in_loop(stream.loop, _settle, stream.added, exc)

    def _on_ready(self, message: Ready) -> None:
        self.compile_seconds, self.warmup_seconds = message.compile_seconds, message.warmup_seconds
        self.ready.set()

    def _on_idle(self, message: Idle) -> None:
        self.stats = message.stats
        self._notify("on_idle", message.stats)

    def _on_refreshed(self, message: Refreshed) -> None:
        with self._lock:
            waiting = self._queries.pop(message.query, None)
        if message.stats is not None:
            self._on_idle(Idle(message.stats))
        if waiting is not None:
            _call_in_loop(waiting[0], _settle, waiting[1], None, message.stats)

    def _die(self, reason: str) -> None:
        """Fail every live stream and waiting query; later calls raise EngineDeadError. An engine that died
        unasked also calls the on_death hooks."""
        with self._lock:
            self.error = reason
            self.failed = not self._stopping
            queries, self._queries = self._queries, {}
        if self.failed:
            logger.error("engine stopped: %s", reason)
        self._fail_all(EngineDeadError(f"the engine stopped: {reason}"))
        for loop, future in queries.values():
            _call_in_loop(loop, _settle, future, None, None)
        self._outbox.put(None)  # stop the writer
        if self.failed:
            for hook in self.on_death:
                try:
                    hook(reason)
                except Exception:
                    logger.exception("engine death hook %r failed", hook)


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
