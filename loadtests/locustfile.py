"""Locust users that stream completions and chat from moe-serve (or any OpenAI-compatible server) as real
clients do, reporting per request type:

  POST /v1/completions, POST /v1/chat/completions   end-to-end time; "size" = output tokens (from `usage`)
  TTFT <route>                                       request sent to first content chunk
  ITL <route>                                        gap between consecutive content chunks

Headless:
  locust -f loadtests/locustfile.py --headless -u 8 -r 8 -t 60s --host http://127.0.0.1:8000 \
      --prompt-tokens 32-256 --output-tokens 64 --chat-share 0.25 --max-requests 2000

Users send their next request as soon as the last one ends (a closed loop of -u concurrent clients). Prompts are
stretches of the corpus's test split cut to a drawn token length; outputs run to the drawn length (`ignore_eos`).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import gevent
import requests
from locust import User, constant, events, task
from locust.env import Environment
from locust.exception import StopUser

from corpus.splits import REPO_ROOT
from loadtests.workload import LengthDistribution, PromptPool

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
# The bundled models share one tokenizer; imported by path, so no locust process loads torch.
BUNDLED_TOKENIZER = REPO_ROOT / "models" / "tiny-simbal" / "tokenizer.json"


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("moe-serve workload")
    group.add_argument("--model-name", default="", help="`model` to send (default: the server's first model)")
    group.add_argument("--prompt-tokens", default="32-256", help="N, A-B or lognormal:MEDIAN:SIGMA")
    group.add_argument("--output-tokens", default="32-128", help="N, A-B or lognormal:MEDIAN:SIGMA")
    group.add_argument("--chat-share", type=float, default=0.25, help="share of requests sent as chat")
    group.add_argument("--temperature", type=float, default=0.8)
    group.add_argument("--tokenizer", default=str(BUNDLED_TOKENIZER), help="cuts the prompts")
    group.add_argument("--api-key", default="", env_var="MOE_SERVE_API_KEY", help="sent as a Bearer token")
    group.add_argument("--max-requests", type=int, default=0, help="stop the run after this many (0: no bound)")
    group.add_argument("--workload-seed", type=int, default=0, help="seeds prompts and lengths per user")
    group.add_argument("--request-timeout", type=float, default=300.0, help="seconds without a byte before failing")
    group.add_argument("--samples-file", default="", help="write every request's timings here as JSON at the end")


@events.test_start.add_listener
def _prepare(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    environment.workload = {  # type: ignore[attr-defined]
        "prompts": PromptPool(Path(options.tokenizer)),
        "prompt_tokens": LengthDistribution.parse(options.prompt_tokens),
        "output_tokens": LengthDistribution.parse(options.output_tokens),
        "started": 0,
        "samples": [],
    }


@events.test_stop.add_listener
def _write_samples(environment: Environment, **_: Any) -> None:
    """Exact per-request timings (locust's own statistics round times above 100 ms to 2 significant digits)."""
    if environment.parsed_options.samples_file:
        Path(environment.parsed_options.samples_file).write_text(json.dumps(environment.workload["samples"]))


class StreamError(Exception):
    """The server answered with an error status or broke off a stream; the message carries its body."""


class OpenAIStreamingUser(User):
    """One client: streams a completion or a chat completion, then sends the next."""

    wait_time = constant(0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.workload: dict[str, Any] = self.environment.workload  # type: ignore[attr-defined]
        self.client = requests.Session()
        self.timeout = (10.0, options.request_timeout)
        self.headers = {}
        if options.api_key:
            self.headers["Authorization"] = f"Bearer {options.api_key}"
        self.rng = random.Random(options.workload_seed * 1_000_003 + id(self) % 1_000_003)
        self.model = options.model_name or self._first_model()

    def on_stop(self) -> None:
        self.client.close()

    def _first_model(self) -> str:
        response = self.client.get(f"{self.host}/v1/models", headers=self.headers, timeout=self.timeout)
        if response.status_code != 200:
            raise StreamError(f"GET /v1/models answered {response.status_code}: {response.text[:300]}")
        return response.json()["data"][0]["id"]

    @task
    def generate(self) -> None:
        options = self.environment.parsed_options
        if options.max_requests and self.workload["started"] >= options.max_requests:
            gevent.spawn(self.environment.runner.quit)
            raise StopUser()
        self.workload["started"] += 1
        prompt = self.workload["prompts"].prompt(self.workload["prompt_tokens"].sample(self.rng), self.rng)
        max_tokens = self.workload["output_tokens"].sample(self.rng)
        body: dict[str, Any] = {
            "model": self.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": options.temperature,
            "ignore_eos": True,
        }
        if self.rng.random() < options.chat_share:
            route = CHAT
            body |= {"messages": [{"role": "user", "content": prompt}], "max_completion_tokens": max_tokens}
        else:
            route = COMPLETIONS
            body |= {"prompt": prompt, "max_tokens": max_tokens}
        self._stream(route, body)

    def _stream(self, route: str, body: dict[str, Any]) -> None:
        fire = self.environment.events.request.fire
        start_wall, start = time.time(), time.perf_counter()
        last: float | None = None
        ttft: float | None = None
        gaps: list[float] = []
        output_tokens = 0
        error: Exception | None = None
        try:
            with self.client.post(
                f"{self.host}{route}", json=body, headers=self.headers, stream=True, timeout=self.timeout
            ) as response:
                if response.status_code != 200:
                    raise StreamError(f"{response.status_code}: {response.text[:300]}")
                done = False
                for line in response.iter_lines():
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:].strip()
                    if data == b"[DONE]":
                        done = True  # read on to the end of the body, so the connection can be reused
                        continue
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        output_tokens = chunk["usage"]["completion_tokens"]
                    if not any(_content(choice) for choice in chunk.get("choices", [])):
                        continue
                    now = time.perf_counter()
                    if last is None:
                        ttft = now - start
                        fire(request_type="TTFT", name=route, response_time=ttft * 1000, response_length=0)
                    else:
                        gaps.append(now - last)
                        fire(request_type="ITL", name=route, response_time=gaps[-1] * 1000, response_length=0)
                    last = now
            if not done:
                raise StreamError("the stream ended before [DONE]")
        except Exception as exc:  # noqa: BLE001 - every failure is reported to locust as this request's
            error = exc
        end = time.perf_counter()
        fire(
            request_type="POST",
            name=route,
            start_time=start_wall,
            response_time=(end - start) * 1000,
            response_length=output_tokens,
            exception=error,
            context={},
        )
        self.workload["samples"].append(
            {"start": start, "end": end, "ok": error is None, "ttft": ttft, "itl": gaps, "tokens": output_tokens}
        )


def _content(choice: dict[str, Any]) -> str:
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""
