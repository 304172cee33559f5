"""The replicas profile's load balancer for real: two moe-serve processes on loopback and Debian's nginx running
docker/nginx/nginx.conf in front of them (upstreams and listen address swapped for loopback ones). Requests
through nginx, streamed and not, must reach both replicas and arrive intact; with one replica stopped, every
request must still succeed on the other."""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.config import DEFAULT_MODEL_DIR
from server.launch import LaunchedServer, free_port, launched, stop
from tests.docker.deploy_files import NGINX_CONFIG, require_binary
from tests.docker.local_nginx import local_config, running_nginx, temp_path_directives, upstream_servers

pytestmark = pytest.mark.slow  # two servers and nginx

REPLICA_ARGS = ["--model", str(DEFAULT_MODEL_DIR), "--threads", "1", "--max-num-seqs", "8"]
REQUESTS = 8
SUCCESS = re.compile(r"^moe_serve_request_success_total\{[^}]*\} (\S+)$", re.MULTILINE)


@dataclass
class Stack:
    replicas: list[LaunchedServer]
    url: str
    error_log: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    nginx = require_binary("nginx", "nginx", "MOE_SERVE_REQUIRE_NGINX")
    scratch = tmp_path_factory.mktemp("replicas")
    template = NGINX_CONFIG.read_text()
    with ExitStack() as stack:
        replicas = []
        for number in range(len(upstream_servers(template))):
            log = stack.enter_context(open(scratch / f"replica-{number}.log", "wb"))
            replicas.append(stack.enter_context(launched(REPLICA_ARGS, stdout=log, stderr=log)))
        port, files = free_port(), scratch / "nginx"
        files.mkdir()
        upstreams = [f"127.0.0.1:{replica.port}" for replica in replicas]
        config = local_config(template, upstreams, f"127.0.0.1:{port}", files, temp_path_directives(nginx))
        error_log = stack.enter_context(running_nginx(nginx, config, port, files))
        yield Stack(replicas, f"http://127.0.0.1:{port}", error_log)


def finished(replicas: list[LaunchedServer]) -> list[float]:
    """Each replica's finished completions so far (moe_serve_request_success_total over its reasons)."""
    expositions = [httpx.get(f"{replica.url}/metrics", timeout=10).text for replica in replicas]
    return [sum(float(value) for value in SUCCESS.findall(exposition)) for exposition in expositions]


def wait_finished(replicas: list[LaunchedServer], wanted: float, before: list[float]) -> list[float]:
    """Each replica's finished completions since `before`, once they add up to `wanted`."""
    deadline = time.monotonic() + 20
    while True:
        served = [after - start for after, start in zip(finished(replicas), before, strict=True)]
        if sum(served) >= wanted or time.monotonic() > deadline:
            return served
        time.sleep(0.1)


def body(number: int, stream: bool, max_tokens: int = 12) -> dict[str, Any]:
    return {
        "prompt": f"Request {number} and the king said",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


async def streamed_text(http: httpx.AsyncClient, request: dict[str, Any]) -> str:
    """The text of a streamed completion; every event must be a JSON chunk and the last `[DONE]`."""
    async with http.stream("POST", "/v1/completions", json=request) as response:
        assert response.status_code == 200, await response.aread()
        events = [line.removeprefix("data: ") async for line in response.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    return "".join(json.loads(event)["choices"][0]["text"] for event in events[:-1])


async def completion_text(http: httpx.AsyncClient, request: dict[str, Any]) -> str:
    if request["stream"]:
        return await streamed_text(http, request)
    response = await http.post("/v1/completions", json=request)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


async def send_all(url: str, requests: list[dict[str, Any]]) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        return list(await asyncio.gather(*(completion_text(http, request) for request in requests)))


def test_requests_through_nginx_reach_both_replicas(stack: Stack) -> None:
    before = finished(stack.replicas)
    requests = [body(number, stream=number % 2 == 1) for number in range(REQUESTS)]
    texts = asyncio.run(send_all(stack.url, requests))
    assert all(texts)
    served = wait_finished(stack.replicas, REQUESTS, before)
    assert sum(served) == REQUESTS and all(count >= 1 for count in served), served


def test_streams_arrive_intact_through_nginx(stack: Stack) -> None:
    """Greedy decoding makes every replica's text the same: a stream through nginx must join to exactly what
    each replica answers directly without streaming."""
    request = body(0, stream=False, max_tokens=24)
    direct = [asyncio.run(send_all(replica.url, [request]))[0] for replica in stack.replicas]
    through = asyncio.run(send_all(stack.url, [{**request, "stream": True}] * 4))
    assert len(set(direct)) == 1 and direct[0]
    assert through == direct[:1] * 4


def test_a_stream_reaches_the_client_event_by_event(stack: Stack) -> None:
    """Each event is passed on as the replica sends it: the client reads a long stream in about as many pieces
    as it has events, not a buffer of tens of events at a time. (Debian's nginx 1.22 passed these events on
    one by one even with proxy_buffering on, so this guards the delivery, not that directive.)"""

    async def reads_of_a_long_stream() -> list[bytes]:
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
            request = body(0, stream=True, max_tokens=200)
            async with http.stream("POST", "/v1/completions", json=request) as response:
                return [chunk async for chunk in response.aiter_raw()]

    reads = asyncio.run(reads_of_a_long_stream())
    stream = b"".join(reads)
    assert stream.rstrip().endswith(b"data: [DONE]") and stream.count(b"data: ") > 100
    events_per_read = [read.count(b"data: ") for read in reads]
    assert statistics.median(events_per_read) <= 4, events_per_read


def test_requests_succeed_through_nginx_with_one_replica_stopped(stack: Stack) -> None:
    """Runs last: it stops the second replica. nginx tries it, fails, and passes the request on."""
    survivor, stopped = stack.replicas
    stop(stopped.process, 60.0)
    before, logged = finished([survivor]), len(stack.error_log.read_bytes())
    requests = [body(number, stream=number % 2 == 0) for number in range(REQUESTS)]
    texts = asyncio.run(send_all(stack.url, requests))
    assert all(texts)
    assert wait_finished([survivor], REQUESTS, before) == [REQUESTS]
    errors = stack.error_log.read_bytes()[logged:].decode()
    assert f'upstream: "http://127.0.0.1:{stopped.port}/v1/completions"' in errors, errors
