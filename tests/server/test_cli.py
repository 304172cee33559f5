"""The moe-serve command as a real process: a bad model exits before binding, SIGTERM drains in-flight
requests within the grace period (aborting the rest) and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from server.launch import launched

pytestmark = pytest.mark.slow  # moe-serve processes, signals and timeouts

SERVE_ARGS = ("--threads", "1", "--max-num-seqs", "8")


def command(port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", "--port", str(port), *SERVE_ARGS, *args]


def stream_tokens(port: int, max_tokens: int, started: threading.Event, result: dict[str, object]) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    texts, finish = [], None
    try:
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                started.set()
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if "error" in event:
                        result["error"] = event["error"]
                        continue
                    if event.get("usage"):
                        result["completion_tokens"] = event["usage"]["completion_tokens"]
                    for choice in event["choices"]:
                        texts.append(choice["text"])
                        finish = choice["finish_reason"] or finish
    except httpx.HTTPError as exc:
        result["error"] = exc
    started.set()
    result["chunks"], result["finish"] = len(texts), finish


@pytest.mark.parametrize(("grace", "max_tokens", "completes"), [(30, 120, True), (1, 500, False)])
def test_sigterm_drains_in_flight_requests_then_exits_zero(grace: int, max_tokens: int, completes: bool) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with launched([*SERVE_ARGS, "--shutdown-grace", str(grace)], stderr=subprocess.PIPE, text=True, env=env) as server:
        port, process = server.port, server.process
        started, result = threading.Event(), {}  # type: ignore[var-annotated]
        client = threading.Thread(target=stream_tokens, args=(port, max_tokens, started, result))
        client.start()
        assert started.wait(30)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert stops_accepting(port, within=5.0)
        _, stderr = process.communicate(timeout=grace + 30)
        assert process.returncode == 0
        client.join(30)
        assert time.monotonic() - sent < grace + 20
    assert "Traceback" not in stderr
    if completes:
        assert result["finish"] == "length" and result["completion_tokens"] == max_tokens and "error" not in result
    else:
        assert result["finish"] is None and 0 < result["chunks"] < max_tokens  # type: ignore[operator]
        assert "completion_tokens" not in result
        assert "shutting down" in result["error"]["message"]  # type: ignore[index]


def stops_accepting(port: int, within: float) -> bool:
    """Whether connections to the port are refused within the given seconds (polled: no event says so)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0)
        except httpx.ConnectError:
            return True
        except httpx.HTTPError:
            pass
    return False


def children(pid: int) -> dict[int, str]:
    """A process's children and their names (what /proc/PID/comm holds)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found[int(child)] = Path(f"/proc/{child}/comm").read_text().strip()
    return found


def test_an_engine_that_dies_stops_the_server_with_a_failure_status() -> None:
    with launched([*SERVE_ARGS], stderr=subprocess.PIPE, text=True) as server:
        named = children(server.process.pid)
        assert "moe-serve-reque" in named.values()  # the request workers, named for ps
        engine = next(pid for pid, name in named.items() if name == "moe-serve-engin")
        started, result = threading.Event(), {}  # type: ignore[var-annotated]
        client = threading.Thread(target=stream_tokens, args=(server.port, 480, started, result))
        client.start()
        assert started.wait(30)
        killed = time.monotonic()
        os.kill(engine, signal.SIGKILL)
        _, stderr = server.process.communicate(timeout=30)
        assert time.monotonic() - killed < 5.0
        assert server.process.returncode == 1
        client.join(30)
    assert "the engine stopped" in result["error"]["message"]  # type: ignore[index]
    assert "the engine process died" in stderr and "Traceback" not in stderr


def test_slow_or_oversized_headers_and_slow_bodies_are_cut_off() -> None:
    import socket

    def exchange(port: int, data: bytes, wait: float) -> tuple[bytes, float]:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            start = time.monotonic()
            sock.sendall(data)
            time.sleep(wait)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            return received, time.monotonic() - start

    with launched([*SERVE_ARGS, "--header-timeout", "1", "--body-timeout", "1"]) as server:
        partial = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appli"
        answer, took = exchange(server.port, partial, 0)
        assert answer.startswith(b"HTTP/1.1 408") and 0.9 < took < 5, (answer, took)
        idle, took = exchange(server.port, b"", 0)  # connected, nothing sent
        assert idle.startswith(b"HTTP/1.1 408") and took < 5
        huge = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * (200 << 10) + b"\r\n\r\n"
        answer, _ = exchange(server.port, huge, 0)
        assert answer.startswith(b"HTTP/1.1 431")
        slow_body = (
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"prompt": '
        )
        answer, took = exchange(server.port, slow_body, 0)
        assert b" 408 " in answer.split(b"\r\n")[0] and b"did not arrive within 1 s" in answer, answer
        assert httpx.get(f"{server.url}/health").status_code == 200  # the server is fine


@pytest.mark.parametrize("access_log", [True, False])
def test_start_summary_and_a_log_line_per_request(tmp_path: Path, access_log: bool) -> None:
    log = tmp_path / "server.log"
    flags = [*SERVE_ARGS, "--access-log" if access_log else "--no-access-log"]
    body = {"prompt": "Log me", "max_tokens": 3, "ignore_eos": True}
    with open(log, "w") as out, launched(flags, stderr=out) as server:
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200
        streamed = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60)
        assert streamed.text.rstrip().endswith("data: [DONE]")
        assert httpx.get(f"{server.url}/v1/nothing").status_code == 404
    text = log.read_text()
    assert "serving tiny-simbal from" in text and "experts top-4" in text and "KV blocks" in text
    assert "pruning: " in text and "API key not required" in text
    lines = [line for line in text.splitlines() if "moe_serve.access" in line]
    if not access_log:
        assert lines == []
        return
    completions = [line for line in lines if '"POST /v1/completions" 200' in line]
    assert len(completions) == 2 and all("+ 3 completion tokens" in line for line in completions)
    assert any('"GET /v1/nothing" 404' in line and "tokens" not in line for line in lines)
