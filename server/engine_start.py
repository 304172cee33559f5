"""The engine process, started before the server knows what it will run.

Both processes import torch and its compiler (seconds each on a small machine): the server for the engine's
configuration and pruning, the engine process to run the model. Started with spawn, the engine process used to
begin its imports only once the server had finished its own and resolved the flags, so a cold start paid them one
after the other (docs/performance.md, time to ready). Started first, it imports while the server does, then waits
for its arguments (server/engine_process.py: run_engine). Light to import, like server/cli.py.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.connection import Connection
from typing import Any

from engine.allocator import preloading_tcmalloc

PROCESS_NAME = "moe-serve-engine"  # what ps shows (as "moe-serve-engin": the kernel keeps 15 bytes)


class EngineProcess:
    """A spawned engine process importing the engine, and the server's end of its pipe: `run(*arguments)` starts
    the engine (run_engine's arguments after the pipe); `stop()` ends one never told to."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_engine_main, args=(child,), name=PROCESS_NAME, daemon=True)
        with preloading_tcmalloc():  # engine/allocator.py
            self.process.start()
        child.close()

    def run(self, *arguments: Any) -> None:
        try:
            self.conn.send(arguments)
        except (BrokenPipeError, ConnectionResetError):  # it died importing: waiting on the pipe reports its status
            pass

    def stop(self) -> None:
        """End a process never told to run (it has only imported): killed, nothing of it to keep."""
        self.conn.close()
        self.process.kill()
        self.process.join()


def _engine_main(conn: Connection) -> None:
    from server.engine_process import run_engine  # the long import, while the server starts

    try:
        arguments = conn.recv()
    except EOFError:  # the server stopped before it had an engine to run
        return
    run_engine(conn, *arguments)
