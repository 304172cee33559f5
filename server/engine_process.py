"""The engine in its own process: load the model, warm up, then step while requests are live.

The HTTP process and the engine never share a GIL, so serving work (parsing, JSON, socket writes) does not
stall the model's steps. Messages (server/engine_messages.py) go over one duplex pipe, in order. The engine
receives token ids only: tokenizing and checking requests is the HTTP process's work, done before admission.

The loop sends something at least every HEARTBEAT_INTERVAL_S while it is idle (a step's output counts as a
beat), so the HTTP side can tell a frozen engine from a quiet one. Expert counts travel inside EngineStats:
from an asynchronous device copy started every few steps (no host sync per step), and read directly whenever
the engine goes idle.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from engine.llm_engine import EngineConfig, ExpertCounts, LLMEngine
from engine.moe import PendingSnapshot
from engine.sampling_params import InvalidRequestError
from server.child_process import become_child
from server.engine_messages import (
    HEARTBEAT_INTERVAL_S,
    AbortAll,
    AbortRequest,
    Added,
    AddRequest,
    Dead,
    EngineInfo,
    Exit,
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
from server.output_delta import DeltaEncoder

logger = logging.getLogger(__name__)
PROCESS_NAME = "moe-serve-engine"  # what ps shows (as "moe-serve-engin": the kernel keeps 15 bytes)


def _read_counts(engine: LLMEngine) -> ExpertCounts:
    """The expert counters now (one host sync: for idle moments)."""
    return engine.expert_load(), engine.experts_read(), engine.tokens_routed()


class _ExitLoop(Exception):
    """Raised by the Exit handler to leave the loop."""


class _EngineLoop:
    """Steps the engine while it has work; applies the HTTP process's commands between steps."""

    def __init__(self, conn: Connection, engine: LLMEngine, read_every_steps: int) -> None:
        self.conn = conn
        self.engine = engine
        self.read_every_steps = read_every_steps
        self.steps = 0
        self.pending: PendingSnapshot | None = None
        self.deltas = DeltaEncoder()
        self.handlers: dict[type, Callable[[Any], None]] = {
            AddRequest: self._add,
            AbortRequest: self._abort,
            AbortAll: self._abort_all,
            Refresh: self._refresh,
            SetRouting: self._set_routing,
            Exit: self._exit,
        }

    def handle(self, message: ToEngine) -> None:
        self.handlers[type(message)](message)

    def _add(self, message: AddRequest) -> None:
        try:
            self.engine.add_request(message.request_id, message.prompt_token_ids, message.params)
            error = None
        except InvalidRequestError as exc:
            error = ("invalid", str(exc))
        except Exception as exc:  # noqa: BLE001 - reported to the request, the engine goes on
            error = ("error", repr(exc))
        self.conn.send(Added(message.request_id, error))

    def _abort(self, message: AbortRequest) -> None:
        self.engine.abort_request(message.request_id)
        self.deltas.forget(message.request_id)

    def _abort_all(self, _: AbortAll) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort_request(request_id)
        self.deltas.clear()

    def _refresh(self, message: Refresh) -> None:
        idle = not self.engine.has_unfinished_requests()
        stats = self.engine.stats(False, _read_counts(self.engine)) if idle else None
        self.conn.send(Refreshed(message.query, stats))

    def _set_routing(self, message: SetRouting) -> None:
        try:
            with _heartbeats(self.conn):  # a switch that releases experts recompiles the step: seconds
                self.engine.set_token_routing(message.routing, message.pruning)
            error = None
        except ValueError as exc:  # InvalidRequestError and CheckpointError included
            error = str(exc)
        self.conn.send(RoutingSet(message.query, error))

    def _exit(self, _: Exit) -> None:
        raise _ExitLoop

    def run(self) -> None:
        try:
            self._run()
        except _ExitLoop:
            return

    def _run(self) -> None:
        idle_reported = False
        while True:
            if not self.engine.has_unfinished_requests():
                if not idle_reported:
                    self.pending = None
                    self.conn.send(Idle(self.engine.stats(False, _read_counts(self.engine))))
                    idle_reported = True
                if self.conn.poll(HEARTBEAT_INTERVAL_S):
                    self.handle(self.conn.recv())
                else:
                    self.conn.send(Heartbeat())
                continue
            while self.conn.poll():
                self.handle(self.conn.recv())
            if not self.engine.has_unfinished_requests():
                continue
            idle_reported = False
            deltas = [self.deltas.encode(output) for output in self.engine.step()]
            self.conn.send(StepDone(deltas, self.engine.stats(True, self._expert_counts())))

    def _expert_counts(self) -> ExpertCounts | None:
        """Counts from an asynchronous copy that has landed, if any; start the next every few steps."""
        self.steps += 1
        counts = None
        if self.pending is not None and self.pending.ready():
            pending = self.pending
            counts = (
                pending.counts().numpy().copy(),
                pending.experts_read().numpy().copy(),
                pending.tokens().numpy().copy(),
            )
            self.pending = None
        if self.pending is None and self.steps % self.read_every_steps == 0:
            self.pending = self.engine.expert_load_async()
        return counts


@contextmanager
def _heartbeats(conn: Connection) -> Iterator[None]:
    """Keep sending heartbeats while the body runs long without a step (the body itself sends nothing), so
    the HTTP side does not report a busy engine as frozen."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(HEARTBEAT_INTERVAL_S):
            conn.send(Heartbeat())

    thread = threading.Thread(target=beat, name="engine-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def run_engine(
    conn: Connection,
    model: str,
    config: EngineConfig,
    warmup: bool,
    threads: int | None,
    read_every_steps: int,
    parent_pid: int,
    log_level: int = logging.WARNING,
) -> None:
    """The engine process's main function. Its log lines (loading, compilation progress) go to stderr like the
    server's, at the server's level."""
    become_child(PROCESS_NAME, parent_pid)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if threads:
        torch.set_num_threads(threads)
    try:
        engine = LLMEngine(Path(model), config)
    except Exception as exc:  # noqa: BLE001 - the parent raises it again with the same kind and message
        conn.send(LoadFailed(type(exc).__name__, str(exc)))
        return
    info = EngineInfo(
        max_model_len=engine.max_model_len,
        dtype=str(engine.dtype).removeprefix("torch."),
        device=str(engine.device),
        num_kv_blocks=engine.block_manager.num_blocks,
        pid=os.getpid(),
        weight_bytes=engine.weight_bytes,
        released_expert_bytes=engine.released_expert_bytes,
    )
    try:
        conn.send(Loaded(info))
        started = time.perf_counter()
        compile_seconds = engine.warm_up(logger.info) if warmup else 0.0
        conn.send(Ready(compile_seconds, time.perf_counter() - started))
        _EngineLoop(conn, engine, read_every_steps).run()
    except (EOFError, BrokenPipeError):
        return  # the server went away
    except Exception as exc:
        logger.exception("engine stopped")
        conn.send(Dead(repr(exc)))
