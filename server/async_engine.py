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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
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
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]
    num_completions: int

    def put(self, item: RequestOutput | BaseException) -> bool:
        """Hand an item to the request's coroutine; False when its event loop is gone (nobody will read it)."""
        return _call_in_loop(self.loop, self.queue.put_nowait, item)


class AsyncEngine:
    """Serves many concurrent `generate` calls from one continuously batching LLMEngine.

    max_queue bounds the requests admitted but not yet running; beyond it `generate` raises QueueFullError.
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
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._admitted = 0  # requests accepted and not yet finished (read from any thread, written under lock)
        self._lock = threading.Lock()
        self._stopping = False
        self.error: BaseException | None = None
        self.observers = list(observers or [])
        self._warmup = warmup
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    # ----- called from the event loop -----

    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
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
                raise QueueFullError(f"the waiting queue is full ({self.max_queue} requests)")
            self._admitted += 1
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue(), params.n)
        added: asyncio.Future[None] = loop.create_future()

        def add() -> None:
            try:
                self.engine.add_request(request_id, prompt, params)
            except Exception as exc:  # noqa: BLE001 - handed to the caller, not raised on the engine thread
                _call_in_loop(loop, _settle, added, exc)
                self._release()
                return
            self._streams[request_id] = stream
            if not _call_in_loop(loop, _settle, added, None):
                self._abort(request_id)

        self._submit(add)
        finished = False
        try:
            await added  # inside the try: a caller cancelled while the add is queued still aborts it
            while True:
                item = await stream.queue.get()
                # Outputs are cumulative: a consumer that fell behind skips to the newest one.
                while isinstance(item, RequestOutput) and not item.finished and not stream.queue.empty():
                    item = stream.queue.get_nowait()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._submit(lambda: self._abort(request_id))

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; unknown or finished ids are ignored."""
        self._submit(lambda: self._abort(request_id))

    def call(self, fn: Callable[[LLMEngine], Any]) -> asyncio.Future[Any]:
        """Run fn(engine) on the engine thread between steps (e.g. reading expert load); await the result."""
        loop = asyncio.get_running_loop()
        result: asyncio.Future[Any] = loop.create_future()

        def run() -> None:
            try:
                value = fn(self.engine)
            except Exception as exc:  # noqa: BLE001 - handed to the awaiting caller
                _call_in_loop(loop, _settle, result, exc)
                return
            _call_in_loop(loop, _settle, result, None, value)

        self._submit(run)
        return result

    @property
    def num_requests(self) -> int:
        """Requests accepted and not yet finished."""
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
        self._submit(self._abort_all)
        self._thread.join(timeout)

    # ----- the engine thread -----

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wake.set()

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1

    def _abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._release()
            for observer in self.observers:
                observer.on_abort(self.engine, request_id, stream.num_completions)

    def _abort_all(self) -> None:
        for request_id in list(self._streams):
            stream = self._streams[request_id]
            self._abort(request_id)
            stream.put(QueueFullError("the server is shutting down"))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams with one wake-up per event loop, not one per request."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
                self._release()
            batches.setdefault(stream.loop, []).append((stream, output))
        for loop, batch in batches.items():
            if not _call_in_loop(loop, _put_all, batch):
                for _, output in batch:
                    self._abort(output.request_id)

    def _run(self) -> None:
        try:
            if self._warmup is not None:
                self._warmup(self.engine)
            self.ready.set()
            while True:
                while True:
                    try:
                        self._commands.get_nowait()()
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
                self._deliver(outputs)
                for observer in self.observers:
                    observer.on_step(self.engine, outputs)
        except Exception as exc:
            logger.exception("engine thread stopped")
            self.error = exc
            for stream in self._streams.values():
                stream.put(EngineDeadError(f"the engine stopped: {exc!r}"))
            self._streams.clear()


def _call_in_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> bool:
    """Schedule fn(*args) on loop from another thread; False if the loop has closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        return False
    return True


def _put_all(batch: list[tuple[_Stream, RequestOutput]]) -> None:
    for stream, output in batch:
        stream.queue.put_nowait(output)


def _settle(future: asyncio.Future[Any], exc: BaseException | None, value: Any = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)
