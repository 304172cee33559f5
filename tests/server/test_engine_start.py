"""The engine process started before the server knows what to run (server/engine_start.py): one never told to run
ends, whether the server stops it or just goes away."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from engine.allocator import loaded, tcmalloc_path
from server.engine_start import EngineProcess


def test_an_engine_process_never_told_to_run_ends_when_stopped() -> None:
    started = EngineProcess()
    started.stop()
    assert not started.process.is_alive() and started.process.exitcode is not None


def test_an_engine_process_whose_server_closed_the_pipe_exits_by_itself() -> None:
    """What the server's exit does to it: it finishes importing, finds the pipe closed and returns (status 0)."""
    started = EngineProcess()
    started.conn.close()
    started.process.join(120)
    assert started.process.exitcode == 0


def test_running_an_engine_process_that_died_leaves_the_report_to_the_wait_for_it() -> None:
    """A process that died before its arguments came (a broken install): run() does not raise; the server's wait
    on the pipe then finds it closed and reports the exit status (server/async_engine.py)."""
    started = EngineProcess()
    started.process.kill()
    started.process.join()
    started.run("model", None)
    assert started.conn.poll(5)
    with pytest.raises(EOFError):
        started.conn.recv()


@pytest.mark.skipif(tcmalloc_path() is None, reason="tcmalloc is not installed (Debian: libtcmalloc-minimal4)")
def test_the_engine_process_runs_on_tcmalloc_and_the_server_keeps_its_environment() -> None:
    before = dict(os.environ)
    started = EngineProcess()
    try:
        maps = Path(f"/proc/{started.process.pid}/maps")
        deadline = time.monotonic() + 60  # the child's loader maps its libraries after start() returns
        while not loaded(maps) and started.process.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loaded(maps)
        assert dict(os.environ) == before and not loaded()
    finally:
        started.stop()
