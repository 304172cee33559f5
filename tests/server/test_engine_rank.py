"""WorkerRanks.describe: how a worker rank ended, asked by two threads at once (the rank watcher and the engine's
error path do), names the signal for both: one thread at a time reaps the process."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import wait

from server.engine_rank import WorkerRanks


def describe_at_once(ranks: WorkerRanks, worker: multiprocessing.process.BaseProcess) -> list[str]:
    """What two threads released together get from ranks.describe(worker)."""
    gate, answers = threading.Barrier(2), []

    def describe() -> None:
        gate.wait()
        answers.append(ranks.describe(worker))

    threads = [threading.Thread(target=describe) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return answers


def test_two_threads_describing_a_killed_rank_both_name_the_signal() -> None:
    context = multiprocessing.get_context("fork")
    for _ in range(10):
        ranks = object.__new__(WorkerRanks)  # its processes only: no model, no store
        worker = context.Process(target=time.sleep, args=(60,), daemon=True)
        worker.start()
        ranks.processes, ranks._reaping = [worker], threading.Lock()
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        wait([worker.sentinel], 10)
        wanted = f"expert-parallel engine rank 1 (pid {worker.pid}) exited (killed by SIGKILL)"
        assert describe_at_once(ranks, worker) == [wanted, wanted]
