"""Per-request sampling settings, named and defaulted as vLLM's SamplingParams."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property

from engine.token_routing import TokenRouting

# Below this a temperature is greedy: dividing logits by it would overflow (vLLM's rule).
GREEDY_TEMPERATURE = 1e-5
INT64_MAX = 2**63 - 1


class InvalidRequestError(ValueError):
    """A request the engine can never run; the message names the field, and `param` is that field's name when
    there is one (a server answers 400 with it)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class RequestOutputKind(Enum):
    """Which step outputs a request gets (vLLM's names): CUMULATIVE, its whole output so far after every step
    that advanced it; DELTA, after every such step only what is new since its last output (each completion's new
    text, token ids and logprobs; the rest as CUMULATIVE gives it), so a step's outputs cost what it added, not
    what came before (the server streams this way); FINAL_ONLY, only the finished one (offline generate, which
    reads nothing else: building an output per sequence per step cost a batch-32 decode step 4%,
    docs/performance.md)."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    """How to sample one request. temperature 0 is greedy; top_k <= 0 and top_p 1 disable those filters."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # This request's routing budget; None: the engine's (EngineConfig.token_routing).
    routing: TokenRouting | None = None
    # Teacher forcing: emit these tokens instead of sampling (at most max_tokens of them), so `logprobs` score a
    # reference continuation as decode steps compute it, batch-mates and decode-time routing included.
    forced_tokens: list[int] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.top_k = max(self.top_k, 0)
        if 0.0 < self.temperature < GREEDY_TEMPERATURE:
            self.temperature = 0.0
        checks = [
            (self.n >= 1, "n", "must be at least 1"),
            (
                self.seed is None or -INT64_MAX - 1 <= self.seed <= INT64_MAX - self.n,
                "seed",
                "must fit in 64 bits (each of n completions uses seed + index)",
            ),
            (0.0 <= self.temperature <= 100.0, "temperature", "must be in [0, 100]"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.max_tokens is None or self.max_tokens >= 0, "max_tokens", "must be at least 0"),
            (self.min_tokens >= 0, "min_tokens", "must be at least 0"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                "min_tokens",
                "must not exceed max_tokens",
            ),
            (self.logprobs is None or self.logprobs >= 0, "logprobs", "must be at least 0"),
            (self.prompt_logprobs is None or self.prompt_logprobs >= 0, "prompt_logprobs", "must be at least 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be token ids"),
            (
                self.forced_tokens is None
                or (bool(self.forced_tokens) and all(isinstance(t, int) and t >= 0 for t in self.forced_tokens)),
                "forced_tokens",
                "must be a non-empty list of token ids",
            ),
            (
                self.forced_tokens is None
                or (self.max_tokens is not None and self.max_tokens <= len(self.forced_tokens)),
                "max_tokens",
                "must be set and at most the number of forced_tokens",
            ),
        ]
        for ok, name, message in checks:
            if not ok:
                raise InvalidRequestError(f"SamplingParams.{name} {message}, got {getattr(self, name)!r}", name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @cached_property
    def stop_holdback(self) -> int:
        """Characters to hold back from streamed text so a partial stop string is never emitted (asked for every
        request's output every step, so worked out once)."""
        if self.include_stop_str_in_output or not self.stop:
            return 0
        return max(len(s) for s in self.stop) - 1
