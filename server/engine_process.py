"""The engine in its own process: load the model, warm up, then step while requests are live.

The HTTP process and the engine never share a GIL, so serving work (parsing, JSON, socket writes) does not
stall the model's steps. Messages go over one duplex pipe, in order:

  to the engine:   ("add", id, prompt, params) | ("abort", id) | ("abort_all",) | ("refresh", query id) | ("exit",)
  from the engine: ("loaded", EngineInfo) | ("failed", kind, message) | ("ready",)
                   ("added", id, None | (kind, message)) | ("step", [OutputDelta], EngineStats)
                   ("idle", EngineStats) | ("refreshed", query id, EngineStats | None) | ("dead", message)

Expert counts travel inside EngineStats: from an asynchronous device copy started every few steps (no host
sync per step), and read directly whenever the engine goes idle.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.llm_engine import EngineConfig, LLMEngine
from engine.moe import PendingSnapshot
from engine.sampling_params import InvalidRequestError, SamplingParams
from server.output_delta import DeltaEncoder

logger = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class EngineInfo:
    """What the HTTP side needs to know about the loaded engine."""

    max_model_len: int
    dtype: str
    device: str
    num_kv_blocks: int
    pid: int
    weight_bytes: int  # parameters resident on the device
    released_expert_bytes: int  # expert weights freed because no routing policy reaches them


@dataclass(frozen=True)
class EngineStats:
    """The engine's state after a step (or when idle): what gauges and the expert-load monitor read."""

    num_step_tokens: int  # tokens run through the model in the step (0 when idle)
    num_running: int  # sequences
    num_waiting: int
    num_requests: int  # requests the engine holds
    kv_cache_usage: float
    num_preemptions: int
    peak_memory_bytes: int = 0  # see LLMEngine.peak_memory_bytes
    expert_counts: np.ndarray | None = None  # routed tokens per [layer, expert], when a read landed


def warm_up(engine: LLMEngine) -> None:
    """Run one short request through prefill and decode, so first-use costs are paid before /ready; its
    routing counts and cached prefix are then forgotten."""
    prompt = list(range(max(1, min(16, engine.max_model_len - 4))))
    max_tokens = min(4, engine.max_model_len - len(prompt))
    engine.add_request("warmup", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    engine.reset_expert_load()
    engine.block_manager.reset_prefix_cache()


def _stats(engine: LLMEngine, counts: np.ndarray | None, stepped: bool) -> EngineStats:
    scheduler = engine.scheduler
    return EngineStats(
        num_step_tokens=engine.last_step.num_tokens if stepped else 0,
        num_running=len(scheduler.running),
        num_waiting=len(scheduler.waiting),
        num_requests=len(engine.requests),
        kv_cache_usage=engine.block_manager.usage,
        num_preemptions=scheduler.num_preemptions,
        peak_memory_bytes=engine.peak_memory_bytes,
        expert_counts=counts,
    )


class _EngineLoop:
    def __init__(self, conn: Connection, engine: LLMEngine, read_every_steps: int) -> None:
        self.conn = conn
        self.engine = engine
        self.read_every_steps = read_every_steps
        self.steps = 0
        self.pending: PendingSnapshot | None = None
        self.deltas = DeltaEncoder()

    def handle(self, message: tuple[Any, ...]) -> bool:
        """Apply one command; False when told to exit."""
        kind = message[0]
        if kind == "add":
            _, request_id, prompt, params = message
            try:
                self.engine.add_request(request_id, prompt, params)
                error = None
            except InvalidRequestError as exc:
                error = ("invalid", str(exc))
            except Exception as exc:  # noqa: BLE001 - reported to the request, the engine goes on
                error = ("error", repr(exc))
            self.conn.send(("added", request_id, error))
        elif kind == "abort":
            self.engine.abort_request(message[1])
            self.deltas.forget(message[1])
        elif kind == "abort_all":
            for request_id in list(self.engine.requests):
                self.engine.abort_request(request_id)
            self.deltas.clear()
        elif kind == "refresh":
            idle = not self.engine.has_unfinished_requests()
            stats = _stats(self.engine, self.engine.expert_load(), False) if idle else None
            self.conn.send(("refreshed", message[1], stats))
        elif kind == "exit":
            return False
        return True

    def run(self) -> None:
        idle_reported = False
        while True:
            if self.engine.has_unfinished_requests():
                while self.conn.poll():
                    if not self.handle(self.conn.recv()):
                        return
            else:
                if not idle_reported:
                    self.pending = None
                    self.conn.send(("idle", _stats(self.engine, self.engine.expert_load(), False)))
                    idle_reported = True
                if not self.handle(self.conn.recv()):
                    return
                continue
            if not self.engine.has_unfinished_requests():
                continue
            idle_reported = False
            deltas = [self.deltas.encode(output) for output in self.engine.step()]
            self.conn.send(("step", deltas, _stats(self.engine, self._expert_counts(), True)))

    def _expert_counts(self) -> np.ndarray | None:
        """Counts from an asynchronous copy that has landed, if any; start the next every few steps."""
        self.steps += 1
        counts = None
        if self.pending is not None and self.pending.ready():
            counts = self.pending.counts().numpy().copy()
            self.pending = None
        if self.pending is None and self.steps % self.read_every_steps == 0:
            self.pending = self.engine.expert_load_async()
        return counts


def run_engine(
    conn: Connection,
    model: str,
    config: EngineConfig,
    warmup: bool,
    threads: int | None,
    read_every_steps: int,
    parent_pid: int,
) -> None:
    """The engine process's main function."""
    # Signals meant for the server (Ctrl-C, `kill -TERM -<group>`) must not reach the engine: the server drains
    # it. And the engine must not outlive the server, even one killed with SIGKILL.
    os.setpgrp()
    _die_with_parent(parent_pid)
    if threads:
        torch.set_num_threads(threads)
    try:
        engine = LLMEngine(Path(model), config)
    except Exception as exc:  # noqa: BLE001 - the parent raises it again with the same kind and message
        conn.send(("failed", type(exc).__name__, str(exc)))
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
        conn.send(("loaded", info))
        if warmup:
            warm_up(engine)
        conn.send(("ready",))
        _EngineLoop(conn, engine, read_every_steps).run()
    except (EOFError, BrokenPipeError):
        return  # the server went away
    except Exception as exc:
        logger.exception("engine stopped")
        conn.send(("dead", repr(exc)))


def _die_with_parent(parent_pid: int) -> None:
    """Have Linux kill this process when the server's process ends (prctl PR_SET_PDEATHSIG)."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the server died before the line above took effect
        os._exit(1)
