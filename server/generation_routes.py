"""The OpenAI-compatible generation routes: models, completions and chat completions, each prepared off the
event loop, admitted to the engine, and answered whole or streamed."""

from __future__ import annotations

import email.message
import time
from collections.abc import AsyncGenerator
from typing import Any, Protocol

from fastapi import FastAPI, Request
from pydantic import BaseModel

from engine.outputs import RequestOutput
from server.async_engine import AsyncEngine
from server.chat import ChatService
from server.completions import CompletionService, usage_of
from server.errors import APIError, ending_with_error_event
from server.openapi import AUTH_ERRORS, GENERATION_ERRORS, generation_responses, request_body
from server.preprocess import PreparedRequest, Preprocessor
from server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from server.settings import ServerSettings
from server.streams import EventStreamResponse, Stream, cancel_on_disconnect, close_all


class GenerationService(Protocol):
    """What completions and chat have in common: start a prepared request, then answer it whole or as a stream."""

    async def start(self, prepared: PreparedRequest) -> tuple[str, list[RequestOutput], list[Stream]]: ...

    async def complete(
        self, request: Any, request_id: str, firsts: list[RequestOutput], streams: list[Stream]
    ) -> BaseModel: ...

    def stream(
        self, request: Any, request_id: str, firsts: list[RequestOutput], streams: list[Stream]
    ) -> AsyncGenerator[str, None]: ...


def add_generation_routes(
    app: FastAPI, engine: AsyncEngine, settings: ServerSettings, preprocessor: Preprocessor
) -> None:
    """GET /v1/models, POST /v1/completions and /v1/chat/completions."""
    completions_service = CompletionService(engine, settings.model_name)
    chat_service = ChatService(engine, settings.model_name)
    started_at = time.time()

    async def respond(service: GenerationService, kind: str, request: Request) -> Any:
        """Prepare the body in a worker, start the request (errors answer before any response), then stream it
        or wait for the whole answer; a client that leaves in any phase has its work cancelled or aborted."""
        body = await _json_body(request)
        prepared = await cancel_on_disconnect(request, preprocessor.prepare(kind, body))
        request_id, firsts, streams = await cancel_on_disconnect(request, service.start(prepared))

        def count_tokens() -> None:  # for the access log (server/middleware.py)
            usage = usage_of([stream.latest or first for first, stream in zip(firsts, streams)])
            request.state.tokens = (usage.prompt_tokens, usage.completion_tokens)

        async def closed() -> None:
            count_tokens()
            await close_all(streams)

        if prepared.body.stream:
            events = ending_with_error_event(service.stream(prepared.body, request_id, firsts, streams))
            return EventStreamResponse(events, on_close=closed)
        try:
            return await cancel_on_disconnect(request, service.complete(prepared.body, request_id, firsts, streams))
        finally:
            count_tokens()

    @app.get("/v1/models", response_model=ModelList, responses=AUTH_ERRORS)
    async def models() -> ModelList:
        card = ModelCard(
            id=settings.model_name,
            created=int(started_at),
            root=str(settings.model_path),
            max_model_len=engine.info.max_model_len,
        )
        return ModelList(data=[card])

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses={**GENERATION_ERRORS, **generation_responses(CompletionResponse)},
        openapi_extra=request_body(CompletionRequest),
    )
    async def completions(request: Request) -> Any:
        """Text completion, OpenAI's legacy endpoint (with vLLM's sampling extras)."""
        return await respond(completions_service, "completion", request)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses={**GENERATION_ERRORS, **generation_responses(ChatCompletionChunk)},
        openapi_extra=request_body(ChatCompletionRequest),
    )
    async def chat_completions(request: Request) -> Any:
        """Chat completion: messages rendered with the model's chat template (or the plain default)."""
        return await respond(chat_service, "chat", request)


async def _json_body(request: Request) -> bytes:
    """The body of a JSON request (no Content-Type is taken as JSON, as FastAPI does); 415 for other types,
    which also keeps browsers' form posts from other sites out."""
    content_type = request.headers.get("content-type")
    if content_type is not None:
        parsed = email.message.Message()
        parsed["content-type"] = content_type
        subtype = parsed.get_content_subtype()
        if parsed.get_content_maintype() != "application" or not (subtype == "json" or subtype.endswith("+json")):
            raise APIError(415, f"Content-Type must be application/json, got {content_type!r}",
                           code="unsupported_media_type")  # fmt: skip
    return await request.body()
