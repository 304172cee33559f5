"""Bad input, overload and faults: each gets its status and OpenAI's error body, and afterwards the engine
holds no request and no KV block."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.server.conftest import LiveServer


def assert_error(response: httpx.Response, status: int, param: str | None = None, says: str = "") -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert says in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"prompt": "x", "temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"prompt": "x", "temperature": "hot"}, "temperature", "valid number"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
        ({"prompt": "x", "top_p": 0}, "top_p", "greater than 0"),
        ({"prompt": "x", "n": 0}, "n", "greater than or equal to 1"),
        ({"prompt": "x", "logprobs": 21}, "logprobs", "less than or equal to 20"),
        ({"prompt": "x", "frobnicate": 1}, "frobnicate", "Unrecognized request argument"),
        ({"prompt": ""}, "prompt", "prompt must not be empty"),
        ({"prompt": ["a", ""]}, "prompt", "prompt[1] must not be empty"),
        ({"prompt": [1, "a"]}, "prompt", "prompt must be a string, a list of strings, token ids"),
        ({"max_tokens": 3}, "prompt", "Field required"),
        ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty", "less than or equal to 0"),
        ({"prompt": "x", "stream": "yes"}, "stream", "valid boolean"),
        ({"prompt": "x", "max_tokens": "16"}, "max_tokens", "valid integer"),
        ({"prompt": [True]}, "prompt", "prompt must be a string"),
        ({"prompt": "x", "logprobs": 14.5}, "logprobs", "valid integer"),
        ({"prompt": "x", "n": True}, "n", "valid integer"),
        ({"prompt": [5000]}, None, "outside the vocabulary"),
    ],
)
def test_invalid_completion_parameters_are_400(
    live_server: LiveServer, body: dict[str, Any], param: str | None, says: str
) -> None:
    with live_server.client() as http:
        assert_error(http.post("/v1/completions", json=body), 400, param, says)


def test_integral_numbers_are_integers_as_json_schema_reads_them(live_server: LiveServer) -> None:
    with live_server.client() as http:
        body = {"prompt": "x", "max_tokens": 2.0, "logprobs": 1.0, "n": 2.0, "ignore_eos": True}
        choices = http.post("/v1/completions", json=body).json()["choices"]
    assert len(choices) == 2 and all(len(c["logprobs"]["tokens"]) == 2 for c in choices)


def test_malformed_json_and_bad_chat_bodies_are_400(live_server: LiveServer) -> None:
    with live_server.client() as http:
        headers = {"content-type": "application/json"}
        assert_error(http.post("/v1/completions", content=b'{"prompt": "x",', headers=headers), 400, says="malformed")
        assert_error(http.post("/v1/chat/completions", json={"messages": []}), 400, "messages")
        bad_role = {"messages": [{"role": "robot", "content": "hi"}]}
        assert_error(http.post("/v1/chat/completions", json=bad_role), 400, "messages")
        top_without = {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}
        assert_error(http.post("/v1/chat/completions", json=top_without), 400, says="requires logprobs")


def test_prompt_longer_than_the_context_names_both_numbers(live_server: LiveServer) -> None:
    limit = live_server.engine.info.max_model_len
    with live_server.client() as http:
        error = assert_error(http.post("/v1/completions", json={"prompt": [1] * 500, "max_tokens": 100}), 400)
        assert "500" in error["message"] and str(limit) in error["message"] and "100" in error["message"]
        chat = {"messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 10}
        assert_error(http.post("/v1/chat/completions", json=chat), 400, says=str(limit))
    live_server.wait_idle()


def test_unknown_model_is_404_and_unknown_route_too(live_server: LiveServer) -> None:
    with live_server.client() as http:
        error = assert_error(http.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404, "model")
        assert error["code"] == "model_not_found"
        assert_error(http.get("/v1/nothing-here"), 404)


def test_one_bad_prompt_in_a_batch_fails_the_request_and_leaves_nothing_running(live_server: LiveServer) -> None:
    body = {"prompt": [[1, 2], [1] * 600], "max_tokens": 400, "ignore_eos": True, "stream": True}
    with live_server.client() as http:
        assert_error(http.post("/v1/completions", json=body), 400, says="maximum context length")
    live_server.wait_idle(timeout=2.0)  # the good prompt was aborted, not left to generate 400 tokens


def test_a_batch_refused_by_the_queue_is_admitted_whole_or_not_at_all(server_factory: Callable[..., Any]) -> None:
    with server_factory(engine_args={"max_num_seqs": 2}, max_queue=4) as live, live.client() as http:
        never = {"prompt": [f"Prompt {i}" for i in range(10)], "max_tokens": 300, "ignore_eos": True}
        error = assert_error(http.post("/v1/completions", json=never), 400, "n", says="can ever hold at once (6")
        long = {"prompt": "Long", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=long) as held:  # 1 of 6 sequences taken
            assert held.status_code == 200
            six = {"prompt": [f"Prompt {i}" for i in range(3)], "n": 2, "max_tokens": 3}
            error = assert_error(http.post("/v1/completions", json=six), 503, says="queue is full")
            assert error["code"] == "queue_full"
            assert live.engine.num_sequences == 1  # nothing of the refused batch was admitted
        five = {"prompt": [f"Prompt {i}" for i in range(5)], "max_tokens": 3}
        assert len(http.post("/v1/completions", json=five).json()["choices"]) == 5
        live.wait_idle(timeout=2.0)


def test_oversized_bodies_are_413_with_or_without_content_length(server_factory: Callable[..., Any]) -> None:
    with server_factory(max_body_bytes=1000) as live, live.client() as http:
        big = {"prompt": "x" * 2000}
        assert_error(http.post("/v1/completions", json=big), 413, says="1000 bytes")

        def chunks() -> Iterator[bytes]:
            yield json.dumps(big).encode()

        error = assert_error(http.post("/v1/completions", content=chunks()), 413)
        assert error["code"] == "request_too_large"
        assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
        live.wait_idle()


def test_api_key_is_required_on_v1_routes_only(server_factory: Callable[..., Any]) -> None:
    with server_factory(api_key="s3cret") as live, live.client() as http:
        body = {"prompt": "x", "max_tokens": 2}
        assert_error(http.post("/v1/completions", json=body), 401, says="missing API key")
        wrong = {"Authorization": "Bearer nope"}
        error = assert_error(http.post("/v1/completions", json=body, headers=wrong), 401, says="incorrect API key")
        assert error["code"] == "invalid_api_key"
        bare = {"Authorization": "s3cret"}  # the key without its scheme
        assert_error(http.post("/v1/completions", json=body, headers=bare), 401, says="incorrect API key")
        right = {"Authorization": "bearer s3cret"}  # the scheme is case-insensitive (RFC 7235)
        assert http.post("/v1/completions", json=body, headers=right).status_code == 200
        assert http.get("/v1/models", headers=right).status_code == 200
        assert http.get("/health").status_code == 200
        metrics = http.get("/metrics").text
        assert 'route="/v1/completions",status_code="401"} 3.0' in metrics  # refused before routing, still labelled


def test_a_full_queue_answers_503_with_retry_after(server_factory: Callable[..., Any]) -> None:
    with server_factory(engine_args={"max_num_seqs": 1}, max_queue=1) as live:
        long = {"prompt": "Long", "max_tokens": 200, "ignore_eos": True, "stream": True}
        statuses: list[int] = []

        def hold() -> None:
            with live.client() as http, http.stream("POST", "/v1/completions", json=long) as response:
                statuses.append(response.status_code)
                for _ in response.iter_lines():
                    pass

        threads = [threading.Thread(target=hold) for _ in range(2)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while not (live.engine.stats.num_running == 1 and live.engine.stats.num_waiting == 1):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with live.client() as http:
            response = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            error = assert_error(response, 503, says="queue is full")
            assert response.headers["Retry-After"] == "1" and error["code"] == "queue_full"
        for thread in threads:
            thread.join(60)
        assert statuses == [200, 200]
        live.wait_idle()


def test_a_client_that_disconnects_mid_stream_is_aborted_at_once(live_server: LiveServer) -> None:
    body = {"prompt": "A long tale", "max_tokens": 450, "ignore_eos": True, "stream": True}
    with live_server.client() as http, http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert live_server.engine.num_sequences == 1
    start = time.monotonic()
    live_server.wait_idle(timeout=2.0)
    assert time.monotonic() - start < 2.0
    assert live_server.engine.stats.num_preemptions == 0


def test_a_non_streaming_client_that_disconnects_is_aborted(live_server: LiveServer) -> None:
    body = {"prompt": "A long tale", "max_tokens": 450, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=live_server.url, timeout=0.3) as http:
        http.post("/v1/completions", json=body)
    live_server.wait_idle(timeout=2.0)
    with live_server.client() as http:
        metrics = http.get("/metrics").text
    assert 'route="/v1/completions",status_code="499"' in metrics  # counted as a client that left
    assert 'status_code="500"' not in metrics
