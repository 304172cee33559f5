"""Locust users that stream completions and chat from moe-serve (or any OpenAI-compatible server) as real
clients do, reporting per request type:

  POST /v1/completions, POST /v1/chat/completions   end-to-end time; "size" = output tokens (from `usage`)
  TTFT <route>                                       request sent to the first chunk carrying a token
  ITL <route>                                        gap between consecutive chunks carrying tokens

Headless:
  locust -f loadtests/locustfile.py --headless -u 8 -r 8 -t 60s --host http://127.0.0.1:8000 \
      --prompt-tokens 32-256 --output-tokens 64 --chat-share 0.25 --max-requests 2000

Users send their next request as soon as the last one ends (a closed loop of -u concurrent clients). Prompts are
stretches of the corpus's test split cut to a drawn token length; outputs run to the drawn length (`ignore_eos`).
--max-requests and --samples-file count and write per locust process (run it as one process, as the sweep does).
"""

from __future__ import annotations

import functools
import itertools
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
import requests
from locust import User, constant, events, task
from locust.env import Environment
from locust.exception import StopUser

from engine.config import DEFAULT_MODEL_DIR
from loadtests.stream import StreamError, read_stream
from loadtests.workload import LengthDistribution, PromptPool

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
# The bundled models share one tokenizer; imported by path, so no locust process loads torch.
BUNDLED_TOKENIZER = DEFAULT_MODEL_DIR / "tokenizer.json"


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
    group.add_argument("--max-requests", type=int, default=0, help="stop after starting this many (0: no bound)")
    group.add_argument("--workload-seed", type=int, default=0, help="seeds prompts and lengths per user")
    group.add_argument("--request-timeout", type=float, default=300.0, help="seconds without a byte before failing")
    group.add_argument("--samples-file", default="", help="write every request's timings here as JSON at the end")


@functools.cache
def _prompt_pool(tokenizer: str) -> PromptPool:
    """Tokenizing the test split once per process: the option check at start and every run share it."""
    return PromptPool(Path(tokenizer))


@dataclass
class RunState:
    """What this locust process's users share during one run."""

    prompts: PromptPool
    prompt_tokens: LengthDistribution
    output_tokens: LengthDistribution
    started: int = 0
    quitting: bool = False
    samples: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_options(cls, options: Any) -> RunState:
        return cls(
            _prompt_pool(options.tokenizer),
            LengthDistribution.parse(options.prompt_tokens),
            LengthDistribution.parse(options.output_tokens),
        )


@events.init.add_listener
def _check_options(environment: Environment, **_: Any) -> None:
    """Bad lengths or a missing tokenizer end locust at once, naming the option, instead of failing every user."""
    options = environment.parsed_options
    if options is None:
        return
    try:
        RunState.from_options(options)
        if not 0.0 <= options.chat_share <= 1.0:
            raise ValueError(f"--chat-share must be in [0, 1], got {options.chat_share}")
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"loadtests/locustfile.py: {exc}")


@events.test_start.add_listener
def _start_run(environment: Environment, **_: Any) -> None:
    environment.run_state = RunState.from_options(environment.parsed_options)  # type: ignore[attr-defined]


@events.test_stop.add_listener
def _write_samples(environment: Environment, **_: Any) -> None:
    """Exact per-request timings (locust's own statistics round times above 100 ms to 2 significant digits)."""
    options = environment.parsed_options
    if options is not None and options.samples_file:
        samples = environment.run_state.samples  # type: ignore[attr-defined]
        Path(options.samples_file).write_text(json.dumps(samples))


USER_NUMBERS = itertools.count()


class OpenAIStreamingUser(User):
    """One client: streams a completion or a chat completion, then sends the next."""

    wait_time = constant(0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.state: RunState = self.environment.run_state  # type: ignore[attr-defined]
        self.client = requests.Session()
        self.timeout = (10.0, options.request_timeout)
        self.headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
        self.rng = random.Random(f"{options.workload_seed}/{next(USER_NUMBERS)}")  # the same draws every run
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
        options, state = self.environment.parsed_options, self.state
        if options.max_requests and state.started >= options.max_requests:
            if not state.quitting:  # the first user to reach the bound ends the run; the others just stop
                state.quitting = True
                gevent.spawn(self.environment.runner.quit)
            raise StopUser()
        state.started += 1
        prompt = state.prompts.prompt(state.prompt_tokens.sample(self.rng), self.rng)
        max_tokens = state.output_tokens.sample(self.rng)
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

        def on_token(kind: str, seconds: float) -> None:
            fire(request_type=kind, name=route, response_time=seconds * 1000, response_length=0)

        start_wall, start = time.time(), time.perf_counter()
        timings, error = None, None
        try:
            with self.client.post(
                f"{self.host}{route}", json=body, headers=self.headers, stream=True, timeout=self.timeout
            ) as response:
                if response.status_code != 200:
                    raise StreamError(f"{response.status_code}: {response.text[:300]}")
                timings = read_stream(response.iter_lines(), start, on_token)
        except Exception as exc:  # noqa: BLE001 - every failure is reported to locust as this request's
            error = exc
        end = time.perf_counter()
        fire(
            request_type="POST",
            name=route,
            start_time=start_wall,
            response_time=(end - start) * 1000,
            response_length=timings.output_tokens if timings else 0,
            exception=error,
            context={},
        )
        sample: dict[str, Any] = {"start": start, "end": end, "ok": error is None}
        if timings is not None:
            sample |= {"ttft": timings.ttft, "itl": timings.itl, "prompt_tokens": timings.prompt_tokens}
            sample["tokens"] = timings.output_tokens
        self.state.samples.append(sample)
