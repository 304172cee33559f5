"""The FastAPI application: OpenAI-compatible generation, health, metrics and expert load over one engine.

A request's path: the route validates its body (protocol), the completion or chat service submits it to the
AsyncEngine (the engine process batches it with every other live request) and turns the outputs into a
response or a stream of server-sent events; the metrics observer watches each engine step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from engine.outputs import RequestOutput
from server.async_engine import AsyncEngine
from server.chat import ChatService
from server.chat_template import ChatTemplate
from server.completions import CompletionService
from server.errors import APIError, ending_with_error_event, install_error_handlers
from server.expert_load import ExpertLoadMonitor, layer_balance
from server.metrics import ServerMetrics
from server.middleware import ServerMiddleware
from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ExpertLoadResponse,
    HealthResponse,
    LayerLoad,
    LoadPeriod,
    ModelCard,
    ModelList,
)
from server.streams import EventStreamResponse, Stream, cancel_on_disconnect, close_all

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Invalid parameters, malformed JSON, or a prompt too long for the context",
        401: "Missing or wrong API key (when the server has one)",
        404: "Unknown model name",
        413: "Body larger than the server accepts",
        503: "Waiting queue full (retry after Retry-After seconds) or server shutting down",
    }.items()
}
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {401: ERRORS[401]}
STREAMING: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "JSON, or server-sent events (`data: {chunk}` lines, then `data: [DONE]`) when stream is true",
    }
}


Body = TypeVar("Body", CompletionRequest, ChatCompletionRequest)
Body_contra = TypeVar("Body_contra", CompletionRequest, ChatCompletionRequest, contravariant=True)


class GenerationService(Protocol[Body_contra]):
    """What completions and chat have in common: start a request, then answer it whole or as a stream."""

    async def start(self, request: Body_contra) -> tuple[str, list[RequestOutput], list[Stream]]: ...

    async def complete(
        self, request: Body_contra, request_id: str, firsts: list[RequestOutput], streams: list[Stream]
    ) -> BaseModel: ...

    def stream(
        self, request: Body_contra, request_id: str, firsts: list[RequestOutput], streams: list[Stream]
    ) -> AsyncGenerator[str, None]: ...


@dataclass
class ServerSettings:
    """How the server exposes the engine; the engine's own settings live in EngineConfig."""

    model_name: str
    model_path: Path
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    shutdown_grace_s: float = 30.0
    per_expert_series: bool | None = None  # None: on unless layers x experts is large
    expert_window_s: float = 60.0
    pruning_labels: dict[str, str] = field(default_factory=dict)  # pruning settings, for the model-info metric


def model_info(engine: AsyncEngine, settings: ServerSettings) -> dict[str, str]:
    config = engine.model_config
    balancing = config.router_balancing
    return {
        "balancing_method": balancing.method if balancing else "unknown",
        "balancing_coef": "" if balancing is None or balancing.coef is None else f"{balancing.coef:g}",
        "architecture": config.model_type,
        "num_layers": str(config.num_layers),
        "num_experts": str(config.num_experts),
        "top_k": str(config.top_k),
        "dtype": engine.info.dtype,
        "device": engine.info.device,
        "max_model_len": str(engine.info.max_model_len),
        "num_kv_blocks": str(engine.info.num_kv_blocks),
        "model_path": str(settings.model_path),
        **settings.pruning_labels,
    }


def build_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    """The app for one started engine; the app's lifespan stops the engine at the end."""
    config = engine.model_config
    monitor = ExpertLoadMonitor(config.num_layers, config.num_experts, settings.expert_window_s)
    metrics = ServerMetrics(
        settings.model_name,
        config,
        engine.info.max_model_len,
        monitor,
        settings.per_expert_series,
        model_info(engine, settings),
        engine.info.weight_bytes,
        engine.info.released_expert_bytes,
    )
    engine.observers += [metrics, monitor]
    template = ChatTemplate.from_model_dir(settings.model_path, engine.tokenizer.tokenizer_config)
    completions_service = CompletionService(engine, settings.model_name)
    chat_service = ChatService(engine, settings.model_name, template)
    started_at = time.time()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown, 0.0, settings.shutdown_grace_s + 10)

    def drain() -> None:
        """Refuse new requests, give in-flight ones the grace period, abort the rest (their streams end with an
        error event) and stop the engine; called as soon as the HTTP server starts shutting down."""
        engine.shutdown(settings.shutdown_grace_s, settings.shutdown_grace_s + 10)

    app = FastAPI(
        title="moe-serve",
        summary="OpenAI-compatible serving of Mixture-of-Experts models, with expert-load metrics.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.drain = drain
    install_error_handlers(app)
    app.add_middleware(
        ServerMiddleware,
        api_key=settings.api_key,
        max_body_bytes=settings.max_body_bytes,
        count=lambda method, route, status: metrics.observe_http(method, route, status),
    )

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health() -> Any:
        """Alive: the engine process runs."""
        if not engine.is_alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return HealthResponse(status="ok")

    @app.get("/ready", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def ready() -> Any:
        """Ready: the model is loaded and warmed up, and the engine runs."""
        if not engine.is_alive or not engine.ready.is_set():
            return JSONResponse({"status": "warming up" if engine.is_alive else "engine stopped"}, status_code=503)
        return HealthResponse(status="ready")

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus_metrics() -> Response:
        """Prometheus text exposition: serving metrics and expert load."""
        await engine.refresh()
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=AUTH_ERRORS)
    async def models() -> ModelList:
        card = ModelCard(
            id=settings.model_name,
            created=int(started_at),
            root=str(settings.model_path),
            max_model_len=engine.info.max_model_len,
        )
        return ModelList(data=[card])

    async def respond(service: GenerationService[Body], body: Body, request: Request) -> Any:
        """Start the request (errors answer before any response), then stream it or wait for the whole answer;
        a client that leaves in either phase has its requests aborted."""
        check_model(body.model)
        request_id, firsts, streams = await cancel_on_disconnect(request, service.start(body))
        if body.stream:
            events = ending_with_error_event(service.stream(body, request_id, firsts, streams))
            return EventStreamResponse(events, on_close=lambda: close_all(streams))
        return await cancel_on_disconnect(request, service.complete(body, request_id, firsts, streams))

    @app.post("/v1/completions", response_model=CompletionResponse, responses={**ERRORS, **STREAMING})
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """Text completion, OpenAI's legacy endpoint (with vLLM's sampling extras)."""
        return await respond(completions_service, body, request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**ERRORS, **STREAMING})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        """Chat completion: messages rendered with the model's chat template (or the plain default)."""
        return await respond(chat_service, body, request)

    def period(counts: np.ndarray, since: float) -> LoadPeriod:
        layers = metrics.moe_layers
        balances = layer_balance(counts)
        rows = []
        for layer in layers:
            b = balances[layer]
            rows.append(
                LayerLoad(
                    layer=layer,
                    routed_tokens=counts[layer].tolist(),
                    max_over_mean=None if np.isnan(b.max_over_mean) else b.max_over_mean,
                    coefficient_of_variation=None
                    if np.isnan(b.coefficient_of_variation)
                    else b.coefficient_of_variation,
                    idle_experts=None if np.isnan(b.idle_experts) else int(b.idle_experts),
                )
            )
        return LoadPeriod(since=since, total_routed=int(counts[layers].sum()), layers=rows)

    @app.get("/v1/experts/load", response_model=ExpertLoadResponse, responses=AUTH_ERRORS)
    async def expert_load() -> ExpertLoadResponse:
        """Routed-token counts per MoE layer and expert since start and since the last reset, with balance."""
        await engine.refresh()
        since_reset, reset_at = monitor.since_reset()
        balancing = config.router_balancing
        return ExpertLoadResponse(
            model=settings.model_name,
            balancing_method=balancing.method if balancing else None,
            num_experts=config.num_experts,
            top_k=config.top_k,
            since_start=period(monitor.totals(), started_at),
            since_reset=period(since_reset, reset_at),
        )

    @app.post("/v1/experts/load/reset", response_model=ExpertLoadResponse, responses=AUTH_ERRORS)
    async def reset_expert_load() -> ExpertLoadResponse:
        """Start a new since-reset period (Prometheus counters keep counting from start)."""
        await engine.refresh()
        monitor.reset()
        return await expert_load()

    return app
