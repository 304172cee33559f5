"""The engine on its own thread, with one asyncio stream per request.

The asyncio event loop never runs model work: requests and aborts go to the engine thread through a command
queue, the thread batches every live request into each `LLMEngine.step`, and each step's outputs are handed
back to the waiting coroutines with `call_soon_threadsafe`. Only the engine thread touches the LLMEngine.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later (HTTP 503)."""


class EngineDeadError(RuntimeError):
    """The engine thread stopped after an unexpected error; no request can be served."""


class EngineObserver(Protocol):
    """Sees the engine from its own thread (metrics): after every step, on every abort, and when it goes idle.

    Calls run on the engine thread between steps, so they must be quick and must not block.
    """

    def on_step(self, engine: LLMEngine, outputs: list[RequestOutput]) -> None: ...

    def on_abort(self, engine: LLMEngine, request_id: str, num_completions: int) -> None: ...

    def on_idle(self, engine: LLMEngine) -> None: ...


@dataclass
class _Command:
    """Work for the engine thread, and what to tell its caller if the engine can no longer run it."""

    run: Callable[[], None]
    refuse: Callable[[BaseException], None] | None = None


@dataclass
class _Stream:
    """A request's link back to its coroutine: only the newest output is kept (outputs are cumulative), so a
    client that stops reading costs one output, not one per step."""

    loop: asyncio.AbstractEventLoop
    num_sequences: int
    latest: RequestOutput | None = None
    error: BaseException | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, item: RequestOutput | BaseException) -> None:
        """Runs in the stream's event loop."""
        if isinstance(item, BaseException):
            self.error = item
        else:
            self.latest = item
        self.changed.set()

    def put(self, item: RequestOutput | BaseException) -> bool:
        """Hand an item over from the engine thread; False when the event loop is gone (nobody will read it)."""
        return _call_in_loop(self.loop, self.offer, item)

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
    """Serves many concurrent `generate` calls from one continuously batching LLMEngine.

    max_queue bounds the sequences (a request with n has n) admitted beyond a full batch; past it `generate`
    raises QueueFullError.
    `warmup(engine)` runs on the engine thread before the first request (requests sent meanwhile wait);
    `ready` is set once it has.
    """

    def __init__(
        self,
        engine: LLMEngine,
        max_queue: int = 256,
        warmup: Callable[[LLMEngine], None] | None = None,
        observers: list[EngineObserver] | None = None,
    ) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._admitted = 0  # sequences accepted and not yet finished (read from any thread, written under lock)
        self._lock = threading.Lock()
        self._stopping = False
        self._closed = False  # the engine thread has ended: commands are refused
        self.error: BaseException | None = None
        self.observers = list(observers or [])
        self._warmup = warmup
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    # ----- called from the event loop -----

    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        """Add a request and yield its latest state after steps that advanced it, the last one finished (a
        consumer slower than the engine gets fewer, later states; outputs are cumulative, so nothing is lost).

        Raises ValueError (invalid request) or QueueFullError before yielding anything. Closing the iterator
        early (a disconnected client) aborts the request in the engine at once.
        """
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped: {self.error!r}")
        with self._lock:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            if self._admitted - self.engine.config.max_num_seqs >= self.max_queue:
                raise QueueFullError(f"the waiting queue is full ({self.max_queue} sequences)")
            self._admitted += params.n
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, params.n)
        added: asyncio.Future[None] = loop.create_future()

        def add() -> None:
            try:
                self.engine.add_request(request_id, prompt, params)
            except Exception as exc:  # noqa: BLE001 - handed to the caller, not raised on the engine thread
                refuse(exc)
                return
            self._streams[request_id] = stream
            if not _call_in_loop(loop, _settle, added, None):
                self._abort(request_id)

        def refuse(exc: BaseException) -> None:
            _call_in_loop(loop, _settle, added, exc)
            self._release(params.n)

        self._submit(_Command(add, refuse))
        finished = False
        try:
            await added  # inside the try: a caller cancelled while the add is queued still aborts it
            while not finished:
                item = await stream.next()
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; unknown or finished ids are ignored."""
        self._submit(_Command(lambda: self._abort(request_id)))

    def call(self, fn: Callable[[LLMEngine], Any]) -> asyncio.Future[Any]:
        """Run fn(engine) on the engine thread between steps (e.g. reading expert load); await the result."""
        loop = asyncio.get_running_loop()
        result: asyncio.Future[Any] = loop.create_future()

        def run() -> None:
            try:
                value = fn(self.engine)
            except Exception as exc:  # noqa: BLE001 - handed to the awaiting caller
                refuse(exc)
                return
            _call_in_loop(loop, _settle, result, None, value)

        def refuse(exc: BaseException) -> None:
            _call_in_loop(loop, _settle, result, exc)

        self._submit(_Command(run, refuse))
        return result

    @property
    def num_sequences(self) -> int:
        """Sequences of requests accepted and not yet finished."""
        return self._admitted

    @property
    def is_alive(self) -> bool:
        """The engine thread is running and has not failed."""
        return self.error is None and self._thread.is_alive()

    def shutdown(self, grace: float = 0.0, timeout: float | None = None) -> None:
        """Refuse new requests, let those in flight finish for up to `grace` seconds, abort the rest (their
        streams end with QueueFullError), and stop the engine thread."""
        with self._lock:
            self._stopping = True
        deadline = time.monotonic() + grace
        while self._admitted and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.01)
        self._submit(_Command(self._abort_all))
        self._thread.join(timeout)

    # ----- the engine thread -----

    def _submit(self, command: _Command) -> None:
        with self._lock:
            if not self._closed:
                self._commands.put(command)
                self._wake.set()
                return
        if command.refuse is not None:
            command.refuse(EngineDeadError("the engine has stopped"))

    def _release(self, num_sequences: int) -> None:
        with self._lock:
            self._admitted -= num_sequences

    def _abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._release(stream.num_sequences)
            for observer in self.observers:
                observer.on_abort(self.engine, request_id, stream.num_sequences)

    def _abort_all(self) -> None:
        for request_id in list(self._streams):
            stream = self._streams[request_id]
            self._abort(request_id)
            stream.put(QueueFullError("the server is shutting down"))

    def _deliver(self, outputs: list[RequestOutput]) -> set[str]:
        """Hand a step's outputs to their streams with one wake-up per event loop, not one per request; return
        the requests aborted because their event loop is gone."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
                self._release(stream.num_sequences)
            batches.setdefault(stream.loop, []).append((stream, output))
        orphaned = set()
        for loop, batch in batches.items():
            if not _call_in_loop(loop, _offer_all, batch):
                for _, output in batch:
                    if not output.finished:
                        orphaned.add(output.request_id)
                        self._abort(output.request_id)
        return orphaned

    def _run(self) -> None:
        try:
            if self._warmup is not None:
                self._warmup(self.engine)
            self.ready.set()
            while True:
                while True:
                    try:
                        self._commands.get_nowait().run()
                    except queue.Empty:
                        break
                if self._stopping and not self._streams:
                    return
                if not self.engine.has_unfinished_requests():
                    for observer in self.observers:
                        observer.on_idle(self.engine)
                    self._wake.wait()
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                orphaned = self._deliver(outputs)
                if orphaned:
                    outputs = [o for o in outputs if o.request_id not in orphaned]
                for observer in self.observers:
                    observer.on_step(self.engine, outputs)
        except Exception as exc:
            logger.exception("engine thread stopped")
            self.error = exc
            for stream in self._streams.values():
                stream.put(EngineDeadError(f"the engine stopped: {exc!r}"))
                self._release(stream.num_sequences)
            self._streams.clear()
        finally:
            self._close()

    def _close(self) -> None:
        """Refuse every command still queued, and every later one, so that no caller waits forever."""
        with self._lock:
            self._closed = True
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command.refuse is not None:
                command.refuse(EngineDeadError("the engine has stopped"))


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
