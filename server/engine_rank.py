"""The engine ranks of `moe-serve --expert-parallel N`: how every rank starts, how rank 0 starts and watches the
others, and the other ranks' main function.

The engine process is rank 0: it spawns N-1 worker processes on the same machine, and all of them join one
process group through a file store in a temporary directory (server/lockstep.py keeps them in step). A worker
that dies is noticed at once through its process sentinel: rank 0 then reports the rank, its pid and exit
status to the HTTP side, which fails the requests in flight and stops the server with a failure status.
Under torchrun (server/torchrun_rank.py) the launcher starts every rank instead, and they join through its
environment; rank 0 then learns of a dead rank from the collective that fails.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path

import torch
import torch.distributed as dist

from engine.expert_parallel import resident_expert_bytes
from engine.expert_parallel_group import (
    check_same_checkpoint,
    gather_from_ranks,
    join_ranks,
    object_group,
    rank_device,
)
from engine.llm_engine import EngineConfig, LLMEngine
from server.child_process import become_child
from server.lockstep import follow

logger = logging.getLogger(__name__)
PROCESS_NAME = "moe-serve-rank"  # what ps shows


@dataclasses.dataclass(frozen=True)
class StartedRank:
    """A rank's engine, its gloo group for commands, and every rank's resident expert bytes."""

    engine: LLMEngine
    group: dist.ProcessGroup | None
    expert_bytes: tuple[int, ...]


def start_rank(
    model: Path, config: EngineConfig, rank: int, init_method: str | None, local_rank: int | None = None
) -> StartedRank:
    """Load this rank's engine (one process when config has no expert shard): join the ranks through
    init_method (file://STORE or ENV_INIT; None: the default process group exists already), check that all load
    the same checkpoint, load the shard on its device (by local_rank, the rank's index on its machine; default
    rank), and gather every rank's expert bytes."""
    if config.expert_shard is None:
        engine = LLMEngine(model, config)
        return StartedRank(engine, None, (resident_expert_bytes(engine.model),))
    device = rank_device(config.device, rank if local_rank is None else local_rank)
    if init_method is not None:
        join_ranks(rank, config.expert_shard.placement.num_ranks, init_method, device)
    group = object_group()
    check_same_checkpoint(model, group)
    engine = LLMEngine(model, dataclasses.replace(config, device=device))
    return StartedRank(engine, group, gather_from_ranks(resident_expert_bytes(engine.model), group))


def follow_lead_rank(
    model: Path, config: EngineConfig, rank: int, init_method: str, warmup: bool, local_rank: int | None = None
) -> None:
    """A worker rank's life after its process is set up: start like rank 0, warm up, then follow rank 0's
    commands until it says Exit. A start-up error is logged here and also raised on rank 0, which reports it;
    the worker exits 1."""
    try:
        started = start_rank(model, config, rank, init_method, local_rank)
    except Exception as exc:  # noqa: BLE001 - every rank raises it alike; rank 0 reports it to the server
        logger.error("engine rank %d could not start: %s", rank, exc)
        raise SystemExit(1) from None
    if warmup:  # as rank 0 does: warm-up steps run collectives too
        started.engine.warm_up()
    assert started.group is not None
    follow(started.engine, started.group)
    dist.destroy_process_group()


def run_worker_rank(
    rank: int,
    model: str,
    config: EngineConfig,
    store: Path,
    warmup: bool,
    threads: int | None,
    parent_pid: int,
    log_level: int,
) -> None:
    """A spawned worker rank's main function (ranks of one machine, joined through a file store)."""
    become_child(PROCESS_NAME, parent_pid)
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s")
    if threads:
        torch.set_num_threads(threads)
    follow_lead_rank(Path(model), config, rank, f"file://{store}", warmup)


class WorkerRanks:
    """Rank 0's handle on ranks 1..N-1: spawns them, watches them, and stops them."""

    def __init__(
        self,
        model: str,
        config: EngineConfig,
        warmup: bool,
        threads: int | None,
        parent_pid: int,
        log_level: int,
    ) -> None:
        assert config.expert_shard is not None
        self.directory = Path(tempfile.mkdtemp(prefix="moe-serve-ranks-"))
        self.store = self.directory / "store"
        context = multiprocessing.get_context("spawn")
        # The engine process is a daemon of the server, and multiprocessing refuses children to daemons. Its
        # workers are daemons of it in turn, so they cannot outlive it either (nor the server: PDEATHSIG).
        multiprocessing.current_process().daemon = False
        self.processes: list[BaseProcess] = []
        for rank in range(1, config.expert_shard.placement.num_ranks):
            args = (rank, model, config, self.store, warmup, threads, parent_pid, log_level)
            process = context.Process(target=run_worker_rank, args=args, name=f"{PROCESS_NAME}-{rank}", daemon=True)
            process.start()
            self.processes.append(process)
        self.stopping = False
        self._reaping = threading.Lock()

    def expect_exit(self) -> None:
        """The workers are about to be told to exit: their ending is not a failure."""
        self.stopping = True

    def watch(self, on_death: Callable[[str], None]) -> None:
        """Call on_death(description) from a watcher thread as soon as a worker exits unasked."""
        threading.Thread(target=self._watch, args=(on_death,), name="rank-watch", daemon=True).start()

    def _watch(self, on_death: Callable[[str], None]) -> None:
        ended = wait([process.sentinel for process in self.processes])
        if self.stopping:
            return
        dead = next(process for process in self.processes if process.sentinel in ended)
        on_death(self.describe(dead))

    def dead(self, timeout: float) -> str | None:
        """A description of a worker that has exited, waiting up to timeout seconds for one; None if all run."""
        ended = wait([process.sentinel for process in self.processes], timeout)
        dead = next((process for process in self.processes if process.sentinel in ended), None)
        return None if dead is None else self.describe(dead)

    def describe(self, process: BaseProcess) -> str:
        """How a worker ended. One thread at a time reaps it: the watcher and the engine's own error path may
        both ask, and a second waitpid racing the first gets no status ("exited (status None)", seen in CI)."""
        code = self._reap(process, 1.0)
        rank = self.processes.index(process) + 1
        status = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"status {code}"
        return f"expert-parallel engine rank {rank} (pid {process.pid}) exited ({status})"

    def stop(self, timeout: float = 30.0) -> None:
        """Wait for workers told to exit, kill those that do not, and remove the store."""
        self.expect_exit()
        for process in self.processes:
            if self._reap(process, timeout) is None:
                process.kill()
                self._reap(process, None)
        self.remove_store()

    def _reap(self, process: BaseProcess, timeout: float | None) -> int | None:
        """Join a worker (up to timeout seconds) and return its exit code, None while it runs."""
        with self._reaping:
            process.join(timeout)
            return process.exitcode

    def remove_store(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
