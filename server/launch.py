"""Start `moe-serve` as its own process on a free loopback port and wait until it is ready: what benchmarks,
load-test sweeps and process-level tests need, so they measure a real server and talk only to loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, timeout: float = 120.0, process: subprocess.Popen[Any] | None = None) -> None:
    """Poll url/ready until it answers 200; RuntimeError if the process exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"moe-serve exited with status {process.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"moe-serve at {url} was not ready after {timeout:g} s")


@dataclass
class LaunchedServer:
    url: str
    port: int
    process: subprocess.Popen[Any]


@contextmanager
def launched(args: list[str], ready_timeout: float = 120.0, **popen: Any) -> Iterator[LaunchedServer]:
    """Run `moe-serve ARGS --port <free port>` until the block ends (then SIGTERM, or kill if it hangs)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "server.cli", *args, "--port", str(port)], **popen)
    server = LaunchedServer(f"http://127.0.0.1:{port}", port, process)
    try:
        wait_ready(server.url, ready_timeout, process)
        yield server
    finally:
        stop(process, 60.0)


def stop(process: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within timeout seconds: nothing outlives its test."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
