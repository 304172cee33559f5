"""The OpenAI-compatible API on a real server, driven by the official openai client and by httpx: every answer
is checked against the offline engine on the same model."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import openai
import pytest

from engine import LLM, SamplingParams
from engine.config import DEFAULT_MODEL_DIR
from engine.outputs import CompletionOutput
from tests.server.conftest import TEST_ENGINE, LiveServer

PROMPTS = ["And the king said", "In the beginning", "To be, or not to be", "Elizabeth looked at"]


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM(DEFAULT_MODEL_DIR, **TEST_ENGINE)


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)


def greedy(max_tokens: int, **kwargs: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kwargs)  # type: ignore[arg-type]


def test_completion_matches_the_offline_engine(client: openai.OpenAI, offline: LLM, live_server: LiveServer) -> None:
    expected = offline.generate(PROMPTS[0], greedy(24))[0]
    response = client.completions.create(model="tiny-simbal", prompt=PROMPTS[0], max_tokens=24, temperature=0)
    choice = response.choices[0]
    assert choice.text == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    live_server.wait_idle()


def test_a_batch_of_text_and_token_prompts_with_n_choices(client: openai.OpenAI, offline: LLM) -> None:
    token_prompt = offline.get_tokenizer().encode(PROMPTS[1])
    response = client.completions.create(
        model="tiny-simbal", prompt=[[*token_prompt], [*token_prompt]], max_tokens=8, temperature=0, n=2
    )
    expected = offline.generate(PROMPTS[1], greedy(8))[0].outputs[0].text
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert all(c.text == expected for c in response.choices)
    texts = client.completions.create(model="tiny-simbal", prompt=PROMPTS[:3], max_tokens=6, temperature=0)
    assert [c.text for c in texts.choices] == [o.outputs[0].text for o in offline.generate(PROMPTS[:3], greedy(6))]
    assert texts.usage is not None and texts.usage.completion_tokens == 18


def test_seeds_reproduce_and_differ(client: openai.OpenAI, offline: LLM) -> None:
    def sample(seed: int) -> str:
        response = client.completions.create(
            model="tiny-simbal", prompt=PROMPTS[2], max_tokens=20, temperature=1.0, top_p=0.95, seed=seed
        )
        return response.choices[0].text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=7)
    assert sample(7) == offline.generate(PROMPTS[2], params)[0].outputs[0].text


def test_stop_sequences_and_vllm_extras(client: openai.OpenAI, offline: LLM) -> None:
    expected = offline.generate(PROMPTS[0], greedy(40, stop=[","]))[0].outputs[0]
    response = client.completions.create(
        model="tiny-simbal", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=[","]
    )
    choice = response.choices[0]
    assert choice.text == expected.text and "," not in choice.text
    assert choice.finish_reason == "stop"
    extras = client.completions.create(
        model="tiny-simbal",
        prompt=PROMPTS[0],
        max_tokens=12,
        temperature=0,
        extra_body={"top_k": 1, "min_tokens": 12, "ignore_eos": True, "stop_token_ids": [0]},
    )
    assert extras.usage is not None and extras.usage.completion_tokens == 12
    assert extras.choices[0].text == offline.generate(PROMPTS[0], greedy(12))[0].outputs[0].text


def test_extreme_sampling_values_are_safe(client: openai.OpenAI, offline: LLM, live_server: LiveServer) -> None:
    expected = offline.generate(PROMPTS[0], greedy(10))[0].outputs[0].text
    tiny = client.completions.create(model="tiny-simbal", prompt=PROMPTS[0], max_tokens=10, temperature=1e-40)
    assert tiny.choices[0].text == expected  # a vanishing temperature is greedy, not an overflow
    huge_k = client.completions.create(
        model="tiny-simbal", prompt=PROMPTS[0], max_tokens=10, temperature=0.5, seed=3, extra_body={"top_k": 2**64}
    )
    assert huge_k.choices[0].finish_reason == "length"
    with live_server.client() as http:
        assert http.get("/health").status_code == 200


def test_streaming_completion_concatenates_to_the_full_answer(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny-simbal", prompt=PROMPTS[3], max_tokens=30, temperature=0, n=2)
    chunks = list(
        client.completions.create(
            model="tiny-simbal",
            prompt=PROMPTS[3],
            max_tokens=30,
            temperature=0,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    for index in (0, 1):
        text = "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == index)
        assert text == full.choices[index].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length", "length"]
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_echo_logprobs_score_the_prompt_as_the_offline_engine(client: openai.OpenAI, offline: LLM) -> None:
    text = "And God said, Let there be light: and there was light."
    response = client.completions.create(
        model="tiny-simbal", prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    choice = response.choices[0]
    assert choice.text == text
    assert choice.logprobs is not None
    token_logprobs = choice.logprobs.token_logprobs
    assert token_logprobs is not None and token_logprobs[0] is None
    reference = offline.generate(text, SamplingParams(max_tokens=0, prompt_logprobs=1))[0]
    ids = reference.prompt_token_ids
    assert reference.prompt_logprobs is not None
    expected = [entry[token].logprob for token, entry in zip(ids[1:], reference.prompt_logprobs[1:])]  # type: ignore[index]
    assert token_logprobs[1:] == pytest.approx(expected, abs=1e-5)
    assert "".join(choice.logprobs.tokens or []) == text
    assert response.usage is not None and response.usage.completion_tokens == 0
    perplexity = math.exp(-sum(expected) / len(expected))
    assert 1 < perplexity < 1000


def test_streamed_logprob_offsets_match_the_full_response_with_held_back_text(client: openai.OpenAI) -> None:
    kwargs = {"model": "tiny-simbal", "prompt": PROMPTS[0], "max_tokens": 30, "temperature": 0, "logprobs": 1}
    stop = {"stop": ["zzz never"]}  # a stop string makes the stream hold text back while tokens run ahead
    full = client.completions.create(**kwargs, **stop)  # type: ignore[call-overload]
    chunks = list(client.completions.create(**kwargs, **stop, stream=True))  # type: ignore[call-overload]
    offsets = [o for c in chunks if c.choices for o in (c.choices[0].logprobs.text_offset or [])]
    tokens = [t for c in chunks if c.choices for t in (c.choices[0].logprobs.tokens or [])]
    assert full.choices[0].logprobs is not None
    assert offsets == full.choices[0].logprobs.text_offset and tokens == full.choices[0].logprobs.tokens


def test_echo_with_generation_streams_the_prompt_first(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny-simbal", prompt=PROMPTS[0], max_tokens=5, temperature=0, echo=True)
    chunks = list(
        client.completions.create(
            model="tiny-simbal", prompt=PROMPTS[0], max_tokens=5, temperature=0, echo=True, logprobs=2, stream=True
        )
    )
    assert chunks[0].choices[0].text.startswith(PROMPTS[0])
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    offsets = [o for c in chunks for o in (c.choices[0].logprobs.text_offset or [])]  # type: ignore[union-attr]
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_chat_uses_the_plain_template_and_streams(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Speak plainly."}, {"role": "user", "content": "Who art thou?"}]
    response = client.chat.completions.create(
        model="tiny-simbal", messages=messages, max_tokens=16, temperature=0, logprobs=True, top_logprobs=2
    )
    plain = "system: Speak plainly.\nuser: Who art thou?\nassistant:"
    completion = client.completions.create(model="tiny-simbal", prompt=plain, max_tokens=16, temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == completion.choices[0].text
    assert response.usage is not None and response.usage.prompt_tokens == completion.usage.prompt_tokens  # type: ignore[union-attr]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert len(choice.logprobs.content) == 16 and all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    stream = client.chat.completions.create(
        model="tiny-simbal",
        messages=messages,
        max_completion_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage == response.usage


def test_models_health_and_ready(live_server: LiveServer, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-simbal"]
    with live_server.client() as http:
        health, ready = http.get("/health").json(), http.get("/ready").json()
    assert health["status"] == "ok" and ready["status"] == "ready"
    assert 0 <= health["engine_silent_s"] < live_server.engine.heartbeat_timeout


def assert_greedy_text_or_near_tie(text: str, expected: CompletionOutput, margin: float = 0.25) -> None:
    """text equals the offline engine's greedy text, or leaves it where that engine's second choice was within
    `margin` nats of its first and takes the second. A bf16 step's logits depend on its batch (a prefill of 5
    rows and one of 120 take different GEMM paths), so a server batching requests as they arrive may break a
    near-tie the other way; a stream that lost, repeated or mixed up tokens would not leave the offline text
    exactly into its runner-up."""
    if text == expected.text:
        return
    assert expected.logprobs is not None
    start = 0
    for token, candidates in zip(expected.token_ids, expected.logprobs):
        chosen = candidates[token]
        if not text.startswith(expected.text[: start + len(chosen.decoded_token or "")]):
            runner_up = [c for t, c in candidates.items() if t != token and c.rank == 2]
            assert text.startswith(expected.text[:start]), (text, expected.text)
            assert runner_up and chosen.logprob - runner_up[0].logprob < margin, (text, expected.text, candidates)
            assert text[start:].startswith(runner_up[0].decoded_token or "\0"), (text, expected.text, candidates)
            return
        start += len(chosen.decoded_token or "")
    raise AssertionError(f"{text!r} differs from {expected.text!r} past its tokens' texts")


def test_many_concurrent_streaming_clients_get_complete_correct_answers(live_server: LiveServer, offline: LLM) -> None:
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(24)]
    expected = [o.outputs[0] for o in offline.generate(prompts, greedy(32, ignore_eos=True, logprobs=2))]

    async def one(http: httpx.AsyncClient, prompt: str) -> tuple[str, list[str]]:
        body = {"prompt": prompt, "max_tokens": 32, "temperature": 0, "ignore_eos": True, "stream": True}
        text, finished = [], []
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choice = json.loads(line[6:])["choices"][0]
                    text.append(choice["text"])
                    finished += [choice["finish_reason"]] if choice["finish_reason"] else []
        return "".join(text), finished

    async def run() -> list[tuple[str, list[str]]]:
        async with httpx.AsyncClient(base_url=live_server.url, timeout=120) as http:
            return await asyncio.gather(*(one(http, p) for p in prompts))

    for (text, finished), offline_output in zip(asyncio.run(run()), expected, strict=True):
        assert finished == ["length"]  # every stream ran its 32 tokens and ended once
        assert_greedy_text_or_near_tie(text, offline_output)
    live_server.wait_idle()


def test_openapi_documents_every_endpoint(live_server: LiveServer) -> None:
    with live_server.client() as http:
        spec = http.get("/openapi.json").json()
    paths = spec["paths"]
    expected = {
        ("/v1/completions", "post"): "CompletionRequest",
        ("/v1/chat/completions", "post"): "ChatCompletionRequest",
    }
    for (path, method), request_model in expected.items():
        operation = paths[path][method]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(request_model)
        assert set(operation["responses"]) >= {"200", "400", "401", "404", "413", "503"}
        assert operation["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
        assert "text/event-stream" in operation["responses"]["200"]["content"]
    for path in ("/v1/models", "/health", "/ready", "/metrics", "/v1/experts/load", "/v1/experts/load/reset"):
        assert path in paths
    schemas = spec["components"]["schemas"]
    completion = schemas["CompletionRequest"]["properties"]
    assert {"prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "logprobs", "echo",
            "user", "top_k", "min_tokens", "ignore_eos", "stop_token_ids"} <= set(completion)  # fmt: skip
    assert schemas["CompletionRequest"]["additionalProperties"] is False
    assert paths["/v1/completions"]["post"]["responses"]["200"]["content"]["application/json"]["schema"][
        "$ref"
    ].endswith("CompletionResponse")


def test_chunk_and_error_shapes_follow_openai(live_server: LiveServer) -> None:
    """The last chat chunk's delta is {} (no null fields); a wrong type names the field as OpenAI does, without
    pydantic's union member names."""
    body = {"messages": [{"role": "user", "content": "Hark"}], "max_tokens": 2, "stream": True}
    with live_server.client() as http:
        events = http.post("/v1/chat/completions", json=body).text.split("\n\n")
        bad = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": 5}]}).json()
        no_body_field = http.post("/v1/completions", json={"prompt": "x", "stream_options": {"include_usage": True}})
    chunks = [json.loads(e.removeprefix("data: ")) for e in events if e.startswith("data: {")]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "length"
    message = bad["error"]["message"]
    assert message.startswith("messages[0].content: ") and ".str" not in message, message
    assert bad["error"]["param"] == "messages"
    assert not no_body_field.json()["error"]["message"].startswith("body")
