"""Request outputs as deltas between the engine process and the HTTP process.

The engine's RequestOutputs are cumulative (every step repeats the whole text, token ids and logprobs so
far). Pickling them every step would cost the square of the output length, so the engine process sends only
what is new since its last message about a request, and the HTTP side rebuilds the cumulative output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.outputs import CompletionOutput, FinishReason, RequestMetrics, RequestOutput, TokenLogprobs


@dataclass(frozen=True)
class CompletionDelta:
    index: int
    text_kept: int  # characters of the previous text that stand (text only grows in practice)
    new_text: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None
    cumulative_logprob: float | None
    finish_reason: FinishReason | None
    stop_reason: int | str | None


@dataclass(frozen=True)
class OutputDelta:
    request_id: str
    finished: bool
    metrics: RequestMetrics | None
    completions: list[CompletionDelta]
    # The prompt's fields, in a request's first delta only.
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass
class _Sent:
    text: dict[int, str] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)


class DeltaEncoder:
    """Engine side: remembers what was sent per request."""

    def __init__(self) -> None:
        self._sent: dict[str, _Sent] = {}

    def encode(self, output: RequestOutput) -> OutputDelta:
        first = output.request_id not in self._sent
        sent = self._sent.setdefault(output.request_id, _Sent())
        completions = []
        for c in output.outputs:
            old_text, old_tokens = sent.text.get(c.index, ""), sent.tokens.get(c.index, 0)
            kept = len(old_text) if c.text.startswith(old_text) else 0
            completions.append(
                CompletionDelta(
                    index=c.index,
                    text_kept=kept,
                    new_text=c.text[kept:],
                    new_token_ids=c.token_ids[old_tokens:],
                    new_logprobs=None if c.logprobs is None else c.logprobs[old_tokens:],
                    cumulative_logprob=c.cumulative_logprob,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
            sent.text[c.index], sent.tokens[c.index] = c.text, len(c.token_ids)
        if output.finished:
            del self._sent[output.request_id]
        return OutputDelta(
            request_id=output.request_id,
            finished=output.finished,
            metrics=output.metrics,
            completions=completions,
            prompt=output.prompt if first else None,
            prompt_token_ids=output.prompt_token_ids if first else None,
            prompt_logprobs=output.prompt_logprobs if first else None,
        )

    def forget(self, request_id: str) -> None:
        """The request was aborted: nothing more will be sent about it."""
        self._sent.pop(request_id, None)

    def clear(self) -> None:
        self._sent.clear()


def apply_delta(previous: RequestOutput | None, delta: OutputDelta) -> RequestOutput:
    """HTTP side: the cumulative output after `delta` (new lists: earlier outputs stay as they were)."""
    old = {c.index: c for c in previous.outputs} if previous is not None else {}
    completions = []
    for d in delta.completions:
        before = old.get(d.index)
        text = (before.text[: d.text_kept] if before else "") + d.new_text
        token_ids = (before.token_ids if before else []) + d.new_token_ids
        logprobs = None
        if d.new_logprobs is not None:
            logprobs = ((before.logprobs or []) if before else []) + d.new_logprobs
        completions.append(
            CompletionOutput(
                index=d.index,
                text=text,
                token_ids=token_ids,
                cumulative_logprob=d.cumulative_logprob,
                logprobs=logprobs,
                finish_reason=d.finish_reason,
                stop_reason=d.stop_reason,
            )
        )
    if previous is None:
        assert delta.prompt_token_ids is not None, "a request's first delta carries its prompt"
        prompt, prompt_token_ids, prompt_logprobs = delta.prompt, delta.prompt_token_ids, delta.prompt_logprobs
    else:
        prompt, prompt_token_ids, prompt_logprobs = previous.prompt, previous.prompt_token_ids, previous.prompt_logprobs
    return RequestOutput(
        request_id=delta.request_id,
        prompt=prompt,
        prompt_token_ids=prompt_token_ids,
        prompt_logprobs=prompt_logprobs,
        outputs=completions,
        finished=delta.finished,
        metrics=delta.metrics,
    )
