"""One client cannot stall the others: each abusive request of the hardening issue, on a real server, gets its
status and a clear error quickly, while another user's stream keeps flowing and /health answers at once."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from tests.server.conftest import LiveServer
from tests.server.test_errors import assert_error

pytestmark = pytest.mark.slow  # abusive clients against live servers

MAX_GAP_S = 1.0  # the largest pause another user's stream may see while an abusive request is handled


class StreamWatch:
    """Another user's long stream, in a thread: when each chunk arrived."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.arrivals: list[float] = []
        self.started = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = {"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True, "stream": True}
        while not self.stop.is_set():  # one stream after another, so the watch outlasts any abuse
            with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        self.arrivals.append(time.monotonic())
                        self.started.set()
                    if self.stop.is_set():
                        return

    def largest_gap(self, start: float, end: float) -> float:
        """The longest stretch of [start, end] in which no chunk arrived."""
        times = [start] + [t for t in self.arrivals if start < t < end] + [end]
        return max(b - a for a, b in itertools.pairwise(times))


@contextmanager
def watched(live: LiveServer) -> Iterator[StreamWatch]:
    watch = StreamWatch(live.url)
    watch.thread.start()
    assert watch.started.wait(30)
    try:
        yield watch
    finally:
        watch.stop.set()
        watch.thread.join(30)


def abuse(live: LiveServer, body: Any, **post: Any) -> tuple[httpx.Response, float, float, float]:
    """Post an abusive body while another stream runs; (response, seconds it took, largest stream gap, the
    slowest /health answer meanwhile)."""
    health_times: list[float] = []
    done = threading.Event()

    def probe_health() -> None:
        with httpx.Client(base_url=live.url, timeout=30) as http:
            while not done.is_set():
                sent = time.monotonic()
                assert http.get("/health").status_code == 200
                health_times.append(time.monotonic() - sent)
                time.sleep(0.05)

    with watched(live) as watch:
        prober = threading.Thread(target=probe_health, daemon=True)
        prober.start()
        start = time.monotonic()
        with live.client() as http:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = http.post("/v1/completions", content=content, headers={"content-type": "application/json"},
                                 **post)  # fmt: skip
        end = time.monotonic()
        time.sleep(0.2)  # the stream's pace after the abuse counts too
        done.set()
        prober.join(30)
        gap = watch.largest_gap(start, time.monotonic())
    return response, end - start, gap, max(health_times, default=0.0)


def test_a_request_of_700000_prompts_is_refused_without_stalling_anyone(live_server: LiveServer) -> None:
    body = b'{"prompt": [' + b",".join([b"[5]"] * 700_000) + b'], "max_tokens": 1}'  # 3.5 MB
    response, took, gap, health = abuse(live_server, body)
    assert_error(response, 400, "prompt", says="700000 prompts; this server accepts at most 128")
    assert "--max-prompts-per-request" in response.json()["error"]["message"]
    assert took < 5.0 and gap < MAX_GAP_S and health < MAX_GAP_S, (took, gap, health)
    live_server.wait_idle()


def test_a_million_word_prompt_is_refused_before_tokenizing(live_server: LiveServer) -> None:
    response, took, gap, health = abuse(live_server, {"prompt": "the " * 1_000_000})
    assert_error(response, 400, "prompt", says="4000000 characters, more than any prompt that fits")
    assert took < 2.0 and gap < MAX_GAP_S and health < MAX_GAP_S, (took, gap, health)
    live_server.wait_idle()


def test_a_long_prompt_that_must_be_tokenized_does_not_stall_streams(live_server: LiveServer) -> None:
    """Under the character bound but over the context: tokenized in a request worker, then refused."""
    response, _, gap, health = abuse(live_server, {"prompt": "the " * 2_000, "max_tokens": 4})
    assert_error(response, 400, says="more than the maximum context length of 512")
    assert gap < MAX_GAP_S and health < MAX_GAP_S, (gap, health)


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"prompt": "x", "n": 64, "stop": ["~"] * 60000}, "stop", "60000 strings; this server accepts at most 16"),
        ({"prompt": "x", "stop": ["~" * 300]}, "stop", "300 characters; this server accepts at most 256"),
        ({"prompt": ["a"] * 8, "n": 64}, "n", "512 sequences (8 prompts x n=64); this server accepts at most 256"),
        ({"prompt": [[1] * 1200] * 120, "max_tokens": 1}, "prompt", "144000 tokens; this server accepts at most"),
    ],
)
def test_per_request_limits_name_their_flag(
    live_server: LiveServer, body: dict[str, Any], param: str, says: str
) -> None:
    response, took, gap, _ = abuse(live_server, body)
    error = assert_error(response, 400, param, says)
    assert "(--max-" in error["message"]
    assert took < 5.0 and gap < MAX_GAP_S, (took, gap)
    live_server.wait_idle()


def test_a_request_that_can_never_fit_is_400_not_503(server_factory: Callable[..., Any]) -> None:
    with server_factory(engine_args={"max_num_seqs": 4}, max_queue=8) as live, live.client() as http:
        body = {"prompt": ["a"] * 4, "n": 4, "max_tokens": 2}  # 16 sequences, the server holds 12
        error = assert_error(http.post("/v1/completions", json=body), 400, "n", "can ever hold at once (12")
        assert "Retry-After" not in http.post("/v1/completions", json=body).headers
        assert error["type"] == "invalid_request_error"
        live.wait_idle()


@pytest.mark.parametrize(
    ("route", "body", "where"),
    [
        ("/v1/completions", '{"prompt": "a\\ud800"}', "prompt"),
        ("/v1/completions", '{"prompt": ["ok", "b\\udfff"]}', "prompt[1]"),
        ("/v1/completions", '{"prompt": "ok", "stop": ["\\ud83d"]}', "stop[0]"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x\\ud800"}]}', "messages[0].content"),
        ("/v1/completions", '{"prompt": "ok", "model": "\\ud800"}', "model"),
    ],
)
def test_lone_surrogates_are_400_naming_the_field(live_server: LiveServer, route: str, body: str, where: str) -> None:
    with live_server.client() as http:
        response = http.post(route, content=body.encode(), headers={"content-type": "application/json"})
    error = assert_error(response, 400, where.split("[")[0].split(".")[0], says=f"{where}: holds a lone UTF-16")
    assert response.content.isascii()  # always encodable
    assert "not valid Unicode" in error["message"]


def test_a_valid_surrogate_pair_is_fine(live_server: LiveServer) -> None:
    with live_server.client() as http:
        response = http.post(
            "/v1/completions",
            content=b'{"prompt": "\\ud83d\\ude00 said", "max_tokens": 2, "echo": true}',
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 200 and response.json()["choices"][0]["text"].startswith("\U0001f600 said")


def test_other_content_types_are_415(live_server: LiveServer) -> None:
    with live_server.client() as http:
        form = http.post("/v1/completions", content=b"prompt=x", headers={"content-type": "text/plain"})
        assert_error(form, 415, says="Content-Type must be application/json")
        bare = http.post("/v1/completions", content=b'{"prompt": "x", "max_tokens": 1}', headers={})
        assert bare.status_code == 200  # no Content-Type is read as JSON, as FastAPI does


def test_a_slow_chat_template_is_bounded_per_request(
    tmp_path: Any, tiny_model: Any, server_factory: Callable[..., Any]
) -> None:
    """A template whose cost depends on the messages: one request's render is stopped at the time bound."""
    from server.request_limits import RequestLimits
    from tests.conftest import copy_checkpoint

    model = copy_checkpoint(tiny_model, tmp_path / "slow-template")
    slow = (
        "{% for m in messages %}{% if m['content'] == 'spin' %}{% for i in range(100000) %}{% for j in "
        "range(100000) %}{% endfor %}{% endfor %}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    (model / "chat_template.jinja").write_text(slow)
    with server_factory(model, limits=RequestLimits(chat_template_timeout=0.5)) as live, live.client() as http:
        start = time.monotonic()
        spin = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "spin"}]})
        assert_error(spin, 400, "messages", says="took longer than 0.5 s (--chat-template-timeout)")
        assert time.monotonic() - start < 5
        fine = http.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        )
        assert fine.status_code == 200
        live.wait_idle()


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("{% include 'other.jinja' %}", "fails on a sample conversation"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x", "took longer than"),
        ("{% for %}", "does not compile"),
    ],
)
def test_a_broken_chat_template_refuses_to_start_naming_its_file(
    tmp_path: Any, tiny_model: Any, server_factory: Callable[..., Any], template: str, says: str
) -> None:
    from server.chat_template import ChatTemplateError
    from server.request_limits import RequestLimits
    from tests.conftest import copy_checkpoint

    model = copy_checkpoint(tiny_model, tmp_path / "broken-template")
    (model / "chat_template.jinja").write_text(template)
    with (
        pytest.raises(ChatTemplateError, match=says) as raised,
        server_factory(model, limits=RequestLimits(chat_template_timeout=0.5)),
    ):
        pass
    assert str(model / "chat_template.jinja") in str(raised.value)


def test_the_host_header_must_be_allowed(server_factory: Callable[..., Any]) -> None:
    from server.middleware import LOOPBACK_HOSTS

    with server_factory(allowed_hosts=LOOPBACK_HOSTS) as live, live.client() as http:
        assert http.get("/health").status_code == 200  # Host: 127.0.0.1:<port>
        assert http.get("/health", headers={"host": f"localhost:{live.url.rsplit(':', 1)[1]}"}).status_code == 200
        rebound = http.post("/v1/completions", json={"prompt": "x"}, headers={"host": "attacker.example:8000"})
        error = assert_error(rebound, 400, says="Host header 'attacker.example' is not allowed")
        assert error["code"] == "host_not_allowed"
        assert http.get("/metrics", headers={"host": "attacker.example"}).status_code == 400


def test_a_frozen_engine_turns_health_unhealthy_and_back(server_factory: Callable[..., Any]) -> None:
    import os
    import signal

    def wait_for(http: httpx.Client, status: int, within: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < within:
            sent = time.monotonic()
            response = http.get("/health")
            assert time.monotonic() - sent < 0.5  # answered at once, frozen engine or not
            if response.status_code == status:
                return time.monotonic() - start
            time.sleep(0.05)
        raise AssertionError(f"/health did not turn {status} within {within} s: {response.json()}")

    with server_factory(heartbeat_timeout=1.0) as live, live.client() as http:
        wait_for(http, 200, 5)
        os.kill(live.engine.info.pid, signal.SIGSTOP)
        try:
            took = wait_for(http, 503, 5)
            assert 0.5 < took < 3.0
            assert "engine unresponsive" in http.get("/health").json()["status"]
        finally:
            os.kill(live.engine.info.pid, signal.SIGCONT)
        wait_for(http, 200, 5)
        assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_health_answers_at_once_under_saturation(server_factory: Callable[..., Any]) -> None:
    with server_factory(engine_args={"max_num_seqs": 8}, max_queue=8) as live:
        statuses: list[int] = []

        def client() -> None:
            body = {"prompt": "Saturate", "max_tokens": 200, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=120) as response:
                statuses.append(response.status_code)
                for _ in response.iter_lines():
                    pass

        clients = [threading.Thread(target=client) for _ in range(24)]
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 30
        while live.engine.num_sequences < 16:  # the batch and the queue are full
            assert time.monotonic() < deadline
            time.sleep(0.01)
        latencies = []
        with live.client() as http:
            for _ in range(20):
                sent = time.monotonic()
                assert http.get("/health").status_code == 200
                latencies.append(time.monotonic() - sent)
        for thread in clients:
            thread.join(120)
        assert max(latencies) < 0.5, latencies
        assert statuses.count(200) >= 16 and set(statuses) <= {200, 503}
        live.wait_idle()
