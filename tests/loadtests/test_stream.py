"""A load-test client's reading of server-sent event streams: timings, usage, and every way a stream can fail."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from loadtests.stream import StreamError, read_stream


def event(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode()


def completion(text: str) -> bytes:
    return event({"choices": [{"index": 0, "text": text}]})


USAGE = event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
DONE = b"data: [DONE]"


def ticking(times: list[float]) -> Iterator[float]:
    yield from times


def test_timings_come_from_token_chunks_and_token_counts_from_usage() -> None:
    clock = ticking([1.25, 1.5, 2.0, 2.25])
    seen: list[tuple[str, float]] = []
    chat_role = event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    chat_text = event({"choices": [{"index": 0, "delta": {"content": "Hi"}}]})
    chat_end = event({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
    held_back = completion("")  # a token whose text waits for the rest of its character
    lines = [chat_role, b"", completion("a"), b": keep", chat_text, held_back, completion("c"), chat_end, USAGE, DONE]
    timings = read_stream(lines, start=1.0, on_token=lambda kind, s: seen.append((kind, s)), clock=lambda: next(clock))
    assert timings.ttft == 0.25 and timings.itl == [0.25, 0.5, 0.25]
    assert (timings.prompt_tokens, timings.output_tokens) == (7, 3)
    assert seen == [("TTFT", 0.25), ("ITL", 0.25), ("ITL", 0.5), ("ITL", 0.25)]


def test_data_lines_without_a_space_are_read() -> None:
    timings = read_stream([b'data:{"choices": [{"text": "x"}]}', USAGE, b"data:[DONE]"], start=0.0, clock=lambda: 1.0)
    assert timings.ttft == 1.0 and timings.output_tokens == 3


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([completion("a"), event({"error": {"message": "engine died"}}), DONE], "error event: engine died"),
        ([completion("a"), USAGE], "ended before \\[DONE\\]"),
        ([completion("a"), DONE], "no usage chunk"),
    ],
)
def test_broken_streams_are_failures(lines: list[bytes], message: str) -> None:
    with pytest.raises(StreamError, match=message):
        read_stream(lines, start=0.0, clock=lambda: 1.0)
