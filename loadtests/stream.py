"""Reading one OpenAI server-sent event stream as a load-test client: when tokens arrived, and how many the server
says it produced. Free of locust (importing locust patches the process for gevent), so tests read it too."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


class StreamError(Exception):
    """The server answered with an error status or an error event, or broke off the stream."""


@dataclass
class StreamTimings:
    """Seconds from the request to its first token's chunk (TTFT), and between token chunks (inter-token latencies)."""

    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0


def read_stream(
    lines: Iterable[bytes],
    start: float,
    on_token: Callable[[str, float], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> StreamTimings:
    """Consume an SSE body to its end; on_token("TTFT" | "ITL", seconds) is told of each chunk that carries a token
    (as vLLM's benchmarks count them: its text may be empty while the server holds back an incomplete character).
    Raises StreamError on an error event, or a stream that ends without [DONE] or without usage."""
    timings = StreamTimings()
    last: float | None = None
    done = usage = False
    for line in lines:
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True  # read on to the end of the body, so the connection can be reused
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            raise StreamError(f"error event: {chunk['error'].get('message', chunk['error'])}")
        if chunk.get("usage"):
            usage = True
            timings.prompt_tokens = chunk["usage"]["prompt_tokens"]
            timings.output_tokens = chunk["usage"]["completion_tokens"]
        if not any(_carries_token(choice) for choice in chunk.get("choices") or []):
            continue
        now = clock()
        if last is None:
            timings.ttft = now - start
            kind, seconds = "TTFT", timings.ttft
        else:
            timings.itl.append(now - last)
            kind, seconds = "ITL", timings.itl[-1]
        if on_token is not None:
            on_token(kind, seconds)
        last = now
    if not done:
        raise StreamError("the stream ended before [DONE]")
    if not usage:
        raise StreamError("the stream carried no usage chunk (stream_options.include_usage)")
    return timings


def _carries_token(choice: dict) -> bool:
    """A completion chunk's choice always does; a chat chunk's does unless it only opens (role) or closes it."""
    delta = choice.get("delta")
    return "text" in choice if delta is None else "content" in delta and "role" not in delta
