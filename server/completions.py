"""POST /v1/completions: a batch of prompts to engine requests, their outputs to OpenAI's response or stream.

Choice i of prompt p is choice p * n + i, as OpenAI and vLLM number them. With `echo`, each choice's text
starts with its prompt, and `logprobs` covers the prompt's tokens too (the first has none): that is how
evaluation harnesses score text, usually with max_tokens 0.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from engine.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from engine.tokenizer import ModelTokenizer
from server.async_engine import AsyncEngine
from server.preprocess import PreparedRequest
from server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from server.streams import Stream, close_all, last, merged, sse, start_all


def usage_of(outputs: list[RequestOutput]) -> Usage:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _logprobs(
    token_ids: list[int], entries: list[TokenLogprobs | None], tokenizer: ModelTokenizer, offset: int
) -> CompletionLogprobs:
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries):
        if entry is None:
            text = tokenizer.decode_token(token_id)
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
        else:
            chosen = entry[token_id]
            text = chosen.decoded_token if chosen.decoded_token is not None else tokenizer.decode_token(token_id)
            result.token_logprobs.append(chosen.logprob)
            result.top_logprobs.append({lp.decoded_token or "": lp.logprob for lp in entry.values()})
        result.tokens.append(text)
        result.text_offset.append(offset)
        offset += len(text)
    return result


def _text_fields(text: str, completion: CompletionOutput) -> str:
    """A choice's fields after its index, as JSON members, for a chunk without logprobs."""
    return (
        f'"text":{json.dumps(text)},"logprobs":null,"finish_reason":{json.dumps(completion.finish_reason)},'
        f'"stop_reason":{json.dumps(completion.stop_reason)}'
    )


def _merge_logprobs(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=first.tokens + second.tokens,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        top_logprobs=first.top_logprobs + second.top_logprobs,
        text_offset=first.text_offset + second.text_offset,
    )


@dataclass
class _ChoiceState:
    """What a streamed choice has sent so far."""

    prefix: str = ""  # the echoed prompt, until the first chunk carries it
    prefix_logprobs: CompletionLogprobs | None = None
    sent_text: int = 0
    sent_tokens: int = 0
    token_offset: int = 0  # text offset of the next logprob token (tokens can run ahead of held-back text)
    done: bool = False


class CompletionService:
    """Serves completion requests from the shared engine."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = engine.tokenizer

    async def start(self, prepared: PreparedRequest) -> tuple[str, list[RequestOutput], list[Stream]]:
        """Admit every prompt at once and wait for each one's first output (errors surface here, before a
        response)."""
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = self.engine.submit(request_id, prepared.prompts, prepared.params, prepared.prompt_texts)
        return request_id, await start_all(streams), streams

    def _prompt_text(self, output: RequestOutput) -> str:
        return output.prompt if output.prompt is not None else self.tokenizer.decode(output.prompt_token_ids)

    def _echo(self, output: RequestOutput, with_logprobs: bool) -> tuple[str, CompletionLogprobs | None]:
        text = self._prompt_text(output)
        if not with_logprobs:
            return text, None
        entries = output.prompt_logprobs or [None] * len(output.prompt_token_ids)
        return text, _logprobs(output.prompt_token_ids, entries, self.tokenizer, 0)

    def _choice_logprobs(self, completion: CompletionOutput, start: int, offset: int) -> CompletionLogprobs:
        entries: list[TokenLogprobs | None] = list((completion.logprobs or [])[start:])
        return _logprobs(completion.token_ids[start:], entries, self.tokenizer, offset)

    async def complete(
        self, request: CompletionRequest, request_id: str, firsts: list[RequestOutput], streams: list[Stream]
    ) -> CompletionResponse:
        try:
            finals = [await last(first, stream) for first, stream in zip(firsts, streams)]
        finally:
            await close_all(streams)
        choices = []
        wants_logprobs = request.logprobs is not None
        for p, output in enumerate(finals):
            echo_text, echo_logprobs = self._echo(output, wants_logprobs) if request.echo else ("", None)
            for completion in output.outputs:
                logprobs = None
                if wants_logprobs:
                    logprobs = self._choice_logprobs(completion, 0, len(echo_text))
                    if echo_logprobs is not None:
                        logprobs = _merge_logprobs(echo_logprobs, logprobs)
                choices.append(
                    CompletionChoice(
                        index=p * request.n + completion.index,
                        text=echo_text + completion.text,
                        logprobs=logprobs,
                        finish_reason=completion.finish_reason,
                        stop_reason=completion.stop_reason,
                    )
                )
        return CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage_of(finals))

    async def stream(
        self, request: CompletionRequest, request_id: str, firsts: list[RequestOutput], streams: list[Stream]
    ) -> AsyncGenerator[str, None]:
        created = int(time.time())
        # Text-only chunks are written by hand (the hot path: one per token per stream); same JSON as the models.
        head = (
            f'{{"id":"{request_id}","object":"text_completion","created":{created},'
            f'"model":{json.dumps(self.model_name)},"choices":[{{"index":'
        )
        choices: dict[int, _ChoiceState] = {}
        finals: dict[int, RequestOutput] = {}
        try:
            async with contextlib.aclosing(merged(firsts, streams)) as outputs:
                async for p, output in outputs:
                    for completion in output.outputs:
                        index = p * request.n + completion.index
                        if index not in choices:
                            choices[index] = self._start_choice(request, output)
                        delta = self._delta(request, choices[index], completion)
                        if delta is None:
                            continue
                        text, logprobs = delta
                        if logprobs is None:
                            yield sse(f"{head}{index},{_text_fields(text, completion)}}}]}}")
                            continue
                        choice = CompletionChoice(
                            index=index,
                            text=text,
                            logprobs=logprobs,
                            finish_reason=completion.finish_reason,
                            stop_reason=completion.stop_reason,
                        )
                        chunk = CompletionResponse(
                            id=request_id, created=created, model=self.model_name, choices=[choice]
                        )
                        yield sse(chunk.model_dump_json(exclude={"usage"}))
                    if output.finished:
                        finals[p] = output
            if request.include_usage:
                usage = usage_of([finals[p] for p in sorted(finals)])
                chunk = CompletionResponse(
                    id=request_id, created=created, model=self.model_name, choices=[], usage=usage
                )
                yield sse(chunk.model_dump_json())
            yield sse("[DONE]")
        finally:
            await close_all(streams)

    def _start_choice(self, request: CompletionRequest, output: RequestOutput) -> _ChoiceState:
        """A choice's stream state; with echo, its first chunk starts with the prompt (and its logprobs)."""
        if not request.echo:
            return _ChoiceState()
        text, logprobs = self._echo(output, request.logprobs is not None)
        return _ChoiceState(prefix=text, prefix_logprobs=logprobs, token_offset=len(text))

    def _delta(
        self, request: CompletionRequest, state: _ChoiceState, completion: CompletionOutput
    ) -> tuple[str, CompletionLogprobs | None] | None:
        """What a choice adds since its last chunk: text and logprobs, or None when there is nothing to send."""
        if state.done:
            return None
        text = state.prefix + completion.text[state.sent_text :]
        new_tokens = len(completion.token_ids) > state.sent_tokens
        state.done = completion.finish_reason is not None
        if not (text or new_tokens or state.done or state.prefix_logprobs):
            return None
        logprobs = None
        if request.logprobs is not None:
            logprobs = self._choice_logprobs(completion, state.sent_tokens, state.token_offset)
            if logprobs.tokens:
                state.token_offset = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
            if state.prefix_logprobs is not None:
                logprobs = _merge_logprobs(state.prefix_logprobs, logprobs)
        state.prefix, state.prefix_logprobs = "", None
        state.sent_text, state.sent_tokens = len(completion.text), len(completion.token_ids)
        return text, logprobs
