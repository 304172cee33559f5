"""POST /v1/chat/completions: messages rendered to one prompt, one engine request with n completions."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator

from engine.outputs import CompletionOutput, RequestOutput
from server.async_engine import AsyncEngine
from server.completions import usage_of
from server.preprocess import PreparedRequest
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
)
from server.streams import Stream, close_all, last, sse, start_all


def _top(token: str, logprob: float) -> TopLogprob:
    return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))


def chat_logprobs(completion: CompletionOutput, start: int, top: int) -> ChatLogprobs:
    content = []
    for token_id, entry in zip(completion.token_ids[start:], (completion.logprobs or [])[start:]):
        chosen = entry[token_id]
        token = chosen.decoded_token or ""
        ranked = sorted((lp for lp in entry.values() if lp.rank <= top), key=lambda lp: lp.rank)
        content.append(
            ChatTokenLogprob(
                token=token,
                logprob=chosen.logprob,
                bytes=list(token.encode()),
                top_logprobs=[_top(lp.decoded_token or "", lp.logprob) for lp in ranked],
            )
        )
    return ChatLogprobs(content=content)


class ChatService:
    """Serves chat completion requests from the shared engine (rendered and tokenized by a request worker)."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    async def start(self, prepared: PreparedRequest) -> tuple[str, list[RequestOutput], list[Stream]]:
        """Admit the request; wait for its first output (errors surface here)."""
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = self.engine.submit(request_id, prepared.prompts, prepared.params)
        return request_id, await start_all(streams), streams

    async def complete(
        self, request: ChatCompletionRequest, request_id: str, firsts: list[RequestOutput], streams: list[Stream]
    ) -> ChatCompletionResponse:
        try:
            output = await last(firsts[0], streams[0])
        finally:
            await close_all(streams)
        choices = [
            ChatChoice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                logprobs=chat_logprobs(c, 0, request.top_logprobs or 0) if request.logprobs else None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for c in output.outputs
        ]
        return ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage_of([output]))

    async def stream(
        self, request: ChatCompletionRequest, request_id: str, firsts: list[RequestOutput], streams: list[Stream]
    ) -> AsyncGenerator[str, None]:
        """One request (chat has no prompt batches): its n choices, each opened by a role chunk."""
        created = int(time.time())

        def chunk(choice: ChatChunkChoice) -> str:
            body = ChatCompletionChunk(id=request_id, created=created, model=self.model_name, choices=[choice])
            return sse(body.model_dump_json(exclude={"usage"}))

        head = (
            f'{{"id":"{request_id}","object":"chat.completion.chunk","created":{created},'
            f'"model":{json.dumps(self.model_name)},"choices":[{{"index":'
        )
        sent_text = [0] * request.n
        sent_tokens = [0] * request.n
        done: set[int] = set()
        try:
            for index in range(request.n):
                yield chunk(ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content="")))
            output = firsts[0]
            while True:
                for c in output.outputs:
                    if c.index in done:
                        continue
                    text = c.text[sent_text[c.index] :]
                    new_tokens = len(c.token_ids) > sent_tokens[c.index]
                    if text or new_tokens:
                        if request.logprobs:
                            logprobs = chat_logprobs(c, sent_tokens[c.index], request.top_logprobs or 0)
                            yield chunk(
                                ChatChunkChoice(index=c.index, delta=DeltaMessage(content=text), logprobs=logprobs)
                            )
                        else:  # the hot path, one per token per stream: written by hand, same JSON as the models
                            content = json.dumps(text)
                            yield sse(
                                f'{head}{c.index},"delta":{{"content":{content}}},"logprobs":null,"finish_reason":null}}]}}'
                            )
                        sent_text[c.index], sent_tokens[c.index] = len(c.text), len(c.token_ids)
                    if c.finish_reason is not None:
                        done.add(c.index)
                        reason = c.finish_reason
                        yield chunk(ChatChunkChoice(index=c.index, delta=DeltaMessage(), finish_reason=reason))
                if output.finished:
                    break
                output = await anext(streams[0])
            if request.include_usage:
                body = ChatCompletionChunk(
                    id=request_id, created=created, model=self.model_name, choices=[], usage=usage_of([output])
                )
                yield sse(body.model_dump_json())
            yield sse("[DONE]")
        finally:
            await close_all(streams)
