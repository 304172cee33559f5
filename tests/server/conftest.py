"""A real moe-serve on a loopback port: uvicorn in a background thread serving the app over real sockets."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from engine.config import DEFAULT_MODEL_DIR
from engine.llm_engine import EngineConfig
from server.app import build_app
from server.async_engine import AsyncEngine
from server.http_protocol import HEADER_TIMEOUT_S, bounded_protocol
from server.launch import wait_ready
from server.settings import ServerSettings

# Small enough to allocate quickly, large enough for every test's concurrency.
TEST_ENGINE = {"max_num_seqs": 32, "kv_cache_memory_bytes": 64 << 20}


@dataclass
class LiveServer:
    url: str
    engine: AsyncEngine
    settings: ServerSettings

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until the engine process reports no request and no KV block in use (what every test must leave
        behind), and the server holds no admitted sequence."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.engine.stats
            if not (stats.num_requests or stats.kv_cache_usage or self.engine.num_sequences):
                return
            time.sleep(0.02)
        raise AssertionError(f"engine not idle: {self.engine.stats}, {self.engine.num_sequences} sequences admitted")


@contextmanager
def serve(
    model: Path = DEFAULT_MODEL_DIR,
    engine_args: dict[str, Any] | None = None,
    max_queue: int = 256,
    heartbeat_timeout: float = 10.0,
    **settings: Any,
) -> Iterator[LiveServer]:
    """Start the engine process and the app (uvicorn) on a free loopback port; stop both on exit."""
    config = EngineConfig(**{**TEST_ENGINE, **(engine_args or {})})
    engine = AsyncEngine(model, config, max_queue, threads=1, heartbeat_timeout=heartbeat_timeout)
    server_settings = ServerSettings(model_name=settings.pop("model_name", model.name), model_path=model, **settings)
    try:
        app = build_app(engine, server_settings)
    except BaseException:
        engine.shutdown(timeout=30)
        raise
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # The HTTP protocol moe-serve runs (header bounds), so that what is tested is what ships.
    config = uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=5, http=bounded_protocol(HEADER_TIMEOUT_S)
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    live = LiveServer(f"http://127.0.0.1:{port}", engine, server_settings)
    try:
        wait_ready(live.url, timeout=60)
        yield live
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        engine.shutdown(timeout=30)


@pytest.fixture(scope="module")
def live_server() -> Iterator[LiveServer]:
    """The bundled SimBal model served with default settings, shared by a test module."""
    with serve() as live:
        yield live


@pytest.fixture
def server_factory() -> Callable[..., Any]:
    """serve() for tests that need their own settings (API key, queue bound, body limit)."""
    return serve
