"""Request outputs as deltas between the engine process and the HTTP process.

The engine process asks its engine for DELTA outputs (engine.sampling_params.RequestOutputKind): each step's
output of a request holds only what that step added, so neither building nor pickling it grows with the output's
length. The HTTP side rebuilds the cumulative output its streams and observers read.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprobs


@dataclass
class OutputDelta:
    """One step's DELTA output of a request (each completion's text, token ids and logprobs are that step's)."""

    request_id: str
    finished: bool
    metrics: RequestMetrics | None
    completions: list[CompletionOutput]
    # The prompt's fields, in a request's first delta only.
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class DeltaEncoder:
    """Engine side: a request's DELTA outputs as messages, its prompt in the first only."""

    def __init__(self) -> None:
        self._started: set[str] = set()

    def encode(self, output: RequestOutput) -> OutputDelta:
        """`output` is a DELTA output (the completions' text, token ids and logprobs are this step's)."""
        first = output.request_id not in self._started
        if output.finished:
            self._started.discard(output.request_id)
        elif first:
            self._started.add(output.request_id)
        return OutputDelta(
            request_id=output.request_id,
            finished=output.finished,
            metrics=output.metrics,
            completions=output.outputs,
            prompt=output.prompt if first else None,
            prompt_token_ids=output.prompt_token_ids if first else None,
            prompt_logprobs=output.prompt_logprobs if first else None,
        )

    def forget(self, request_id: str) -> None:
        """The request was aborted: nothing more will be sent about it."""
        self._started.discard(request_id)

    def clear(self) -> None:
        self._started.clear()


def apply_delta(previous: RequestOutput | None, delta: OutputDelta) -> RequestOutput:
    """HTTP side: the cumulative output after `delta` (new lists: earlier outputs stay as they were)."""
    old = {c.index: c for c in previous.outputs} if previous is not None else {}
    completions = []
    for d in delta.completions:
        before = old.get(d.index)
        text = (before.text if before else "") + d.text
        token_ids = (before.token_ids if before else []) + d.token_ids
        logprobs = None
        if d.logprobs is not None:
            logprobs = ((before.logprobs or []) if before else []) + d.logprobs
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
