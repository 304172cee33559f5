"""The engine in its own process: load the model, warm up, then step while requests are live.

The HTTP process and the engine never share a GIL, so serving work (parsing, JSON, socket writes) does not
stall the model's steps. Messages (server/engine_messages.py) go over one duplex pipe, in order. The engine
receives token ids only: tokenizing and checking requests is the HTTP process's work, done before admission.

The loop sends something at least every HEARTBEAT_INTERVAL_S while it is idle (a step's output counts as a
beat), so the HTTP side can tell a frozen engine from a quiet one. Expert counts travel inside EngineStats:
from an asynchronous device copy started every few steps (no host sync per step), and read directly whenever
the engine goes idle.

Under expert parallelism (EngineConfig.expert_shard) this process is rank 0: it starts the other ranks
(server/engine_rank.py), leads them in lockstep (server/lockstep.py), and is still the only one the HTTP
process talks to.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from engine.expert_parallel_group import ENV_INIT
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
from server.engine_rank import WorkerRanks, start_rank
from server.engine_start import PROCESS_NAME
from server.lockstep import LockstepLeader
from server.output_delta import DeltaEncoder

logger = logging.getLogger(__name__)
# gloo's error when a rank's process is gone (its sockets closed), however that rank was started.
LOST_PEER = re.compile(r"Connection (?:closed|reset) by peer")
PEER_ADDRESS = re.compile(r"\[[^\]]+\]:\d+")
RANK_DEATH_GRACE_S = 0.5  # lets rank 0's own error, raised on every rank alike, be the one reported


class _Outbox:
    """The pipe to the HTTP process, shared by the loop and the rank watcher: sends one at a time, and nothing
    after the one final failure report (LoadFailed before the engine loaded, Dead after)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.loaded = False
        self.failed = False

    def send(self, message: FromEngine) -> None:
        with self.lock:
            if not self.failed:
                self.conn.send(message)
                self.loaded = self.loaded or isinstance(message, Loaded)

    def fail(self, reason: str, kind: str = "RuntimeError") -> bool:
        """Report the engine's failure; False if one was reported already."""
        with self.lock:
            if self.failed:
                return False
            self.failed = True
            self.conn.send(Dead(reason) if self.loaded else LoadFailed(kind, reason))
            return True

    def poll(self, timeout: float = 0.0) -> bool:
        return self.conn.poll(timeout)

    def recv(self) -> ToEngine:
        message: ToEngine = self.conn.recv()
        return message


def _read_counts(engine: LLMEngine) -> ExpertCounts:
    """The expert counters now (one host sync: for idle moments)."""
    return engine.expert_load(), engine.experts_read(), engine.tokens_routed()


class _ExitLoop(Exception):
    """Raised by the Exit handler to leave the loop."""


class _EngineLoop:
    """Steps the engine while it has work; applies the HTTP process's commands between steps."""

    def __init__(
        self,
        conn: _Outbox,
        engine: LLMEngine,
        read_every_steps: int,
        lockstep: LockstepLeader | None = None,
        before_exit: Callable[[], None] = lambda: None,
    ) -> None:
        self.conn = conn
        self.engine = engine
        self.lockstep = lockstep  # the other expert-parallel ranks, if any
        self.before_exit = before_exit
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
        if self.lockstep is not None:
            message = self.lockstep.admit(message)
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
        self.before_exit()
        if self.lockstep is not None:
            self.lockstep.broadcast(step=False)
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
                if self.lockstep is not None:
                    self.lockstep.keep_alive()
                continue
            while self.conn.poll():
                self.handle(self.conn.recv())
            if not self.engine.has_unfinished_requests():
                continue
            idle_reported = False
            if self.lockstep is not None:
                self.lockstep.broadcast(step=True)
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


class _HeartbeatSender(Protocol):
    def send(self, message: Heartbeat) -> None: ...


@contextmanager
def _heartbeats(conn: _HeartbeatSender) -> Iterator[None]:
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
    ranks_from_launcher: bool = False,
) -> None:
    """The engine process's main function. Its log lines (loading, compilation progress) go to stderr like the
    server's, at the server's level. Under expert parallelism it starts the other ranks first, and a rank that
    dies ends this process too, reported to the server by the rank watcher. ranks_from_launcher: torchrun
    started the other ranks; this process joins them through torchrun's environment (it inherits it)."""
    become_child(PROCESS_NAME, parent_pid)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if threads:
        torch.set_num_threads(threads)
    outbox = _Outbox(conn)
    ranks = None
    init_method = None
    if config.expert_shard is not None and ranks_from_launcher:
        init_method = ENV_INIT
    elif config.expert_shard is not None:
        ranks = WorkerRanks(model, config, warmup, threads, os.getpid(), log_level)
        ranks.watch(functools.partial(_rank_died, outbox, ranks))
        init_method = f"file://{ranks.store}"
    try:
        started = start_rank(Path(model), config, 0, init_method)
    except Exception as exc:  # noqa: BLE001 - the parent raises it again with the same kind and message
        outbox.fail(str(exc), type(exc).__name__)
        if ranks is not None:
            ranks.stop(5.0)
        return
    engine = started.engine
    info = EngineInfo(
        max_model_len=engine.max_model_len,
        dtype=str(engine.dtype).removeprefix("torch."),
        device=str(engine.device),
        num_kv_blocks=engine.block_manager.num_blocks,
        pid=os.getpid(),
        weight_bytes=engine.weight_bytes,
        released_expert_bytes=engine.released_expert_bytes,
        expert_weight_bytes=started.expert_bytes,
    )
    lockstep = LockstepLeader(started.group) if started.group is not None else None
    told_to_exit = False
    try:
        outbox.send(Loaded(info))
        begun = time.perf_counter()
        compile_seconds = engine.warm_up(logger.info) if warmup else 0.0
        outbox.send(Ready(compile_seconds, time.perf_counter() - begun))
        before_exit = ranks.expect_exit if ranks is not None else (lambda: None)
        _EngineLoop(outbox, engine, read_every_steps, lockstep, before_exit).run()
        told_to_exit = True
    except (EOFError, BrokenPipeError):
        return  # the server went away
    except Exception as exc:
        lost_peer = _lost_peer(exc) if ranks_from_launcher else None
        if lost_peer is not None:  # torchrun's ranks are not this process's children: a collective tells
            logger.error("lost an expert-parallel engine rank: %s", exc)
            outbox.fail(_rank_failure(f"an expert-parallel engine rank is gone ({lost_peer})"))
            return
        dead_rank = ranks.dead(2 * RANK_DEATH_GRACE_S) if ranks is not None else None
        if dead_rank is None:
            logger.exception("engine stopped")
        outbox.fail(_rank_failure(dead_rank) if dead_rank else repr(exc))
    finally:
        if ranks is not None:  # ranks told to exit get time to; the others are stopped now
            ranks.stop(30.0 if told_to_exit else 0.0)


def _rank_died(outbox: _Outbox, ranks: WorkerRanks, description: str) -> None:
    """The rank watcher's report: the whole engine stops, as if this process had died (the server fails the
    requests in flight and exits non-zero; the other ranks die with this process)."""
    time.sleep(RANK_DEATH_GRACE_S)
    if outbox.fail(_rank_failure(description)):
        logger.error("%s: stopping the engine", description)
        ranks.remove_store()
        os._exit(1)


def _lost_peer(exc: Exception) -> str | None:
    """What gloo says when a rank's process is gone (its connection closed or reset), as "the connection to
    [ADDRESS]:PORT was lost", or the first line of another torch.distributed error; None for any other error."""
    message = str(exc)
    if LOST_PEER.search(message):
        address = PEER_ADDRESS.search(message)
        return f"the connection to {address.group(0) if address else 'a rank'} was lost"
    return next(iter(message.splitlines()), type(exc).__name__) if isinstance(exc, dist.DistError) else None


def _rank_failure(description: str) -> str:
    return f"{description}; the expert-parallel engine cannot go on without it"
