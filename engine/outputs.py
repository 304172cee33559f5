"""Results handed back to callers, shaped as vLLM's RequestOutput and CompletionOutput."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Why a sequence ended: an end or stop token or string, its length limit, or an abort (client gone, shutdown).
FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class Logprob:
    """Log probability of one token, its rank in the distribution (1 = most likely) and its text."""

    logprob: float
    rank: int
    decoded_token: str | None = None


TokenLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One generated continuation of a prompt (a request with n > 1 has n of these)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[TokenLogprobs] | None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestMetrics:
    """When a request reached each stage (time.monotonic seconds), as vLLM's RequestMetrics; None until it has."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    def snapshot(self) -> RequestMetrics:
        """A copy, for an output (made for every request every step: dataclasses.replace takes 3x as long)."""
        return RequestMetrics(
            self.arrival_time, self.first_scheduled_time, self.first_token_time, self.last_token_time,
            self.finished_time,
        )  # fmt: skip


@dataclass
class RequestOutput:
    """State of a request after an engine step; `finished` once every completion is done."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprobs | None] | None
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    metrics: RequestMetrics | None = None
