"""The FastAPI application: OpenAI-compatible generation, health, metrics and expert load over one engine.

A request's path: the middleware checks host, key and body size; the route reads the body and hands it to
a request worker (server/preprocess.py), which parses, validates, renders and tokenizes it off the event loop;
the completion or chat service admits it to the AsyncEngine (the engine process batches it with every other
live request) and turns the outputs into a response or a stream of server-sent events; the metrics observer
watches each engine step.
"""

from __future__ import annotations

import asyncio
import email.message
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from engine.outputs import RequestOutput
from engine.token_routing import TokenRouting
from pruning.serving import LivePruning
from server.admin import RoutingControl, add_admin_routes
from server.async_engine import AsyncEngine, EngineObserver
from server.chat import ChatService
from server.completions import CompletionService, usage_of
from server.errors import APIError, ending_with_error_event, install_error_handlers
from server.expert_load import ExpertLoadMonitor, layer_balance
from server.metrics import ServerMetrics
from server.middleware import ServerMiddleware
from server.openapi import AUTH_ERRORS, GENERATION_ERRORS, generation_responses, install_openapi, request_body
from server.preprocess import ModelBounds, PreparedRequest, Preprocessor
from server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ExpertLoadResponse,
    HealthResponse,
    LayerLoad,
    LoadPeriod,
    ModelCard,
    ModelList,
)
from server.request_limits import RequestLimits
from server.source_experts import SourceExperts, SourceIdObserver
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
    limits: RequestLimits = field(default_factory=RequestLimits)
    request_workers: int = 2
    allowed_hosts: frozenset[str] | None = None  # None: any Host header
    body_timeout_s: float = 30.0
    token_routing: TokenRouting = field(default_factory=TokenRouting)  # requests' routing unless they say
    allow_request_routing: bool = True
    substitution_available: bool = False  # the engine holds the experts' similarity maps
    enable_admin_api: bool = False  # GET/POST /v1/routing
    live_pruning: LivePruning | None = None  # pruning switchable through the admin API (engine's live_pruning)
    access_log: bool = True  # a log line per request (server/middleware.py)


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
    """The app for one started engine: starts the request workers (a chat template that cannot render refuses
    here, with ChatTemplateError); the app's lifespan stops both at the end."""
    config = engine.model_config
    source = SourceExperts.of(settings.model_path, config)  # a checkpoint `moe-prune apply` wrote
    served = source.served_config(config) if source else config  # expert load under the source model's ids
    if source is not None and not settings.pruning_labels.get("prune_method"):
        settings = replace(settings, pruning_labels={**settings.pruning_labels, **source.labels()})
    bounds = ModelBounds(
        settings.model_name,
        config.vocab_size,
        engine.info.max_model_len,
        engine.capacity,
        config.top_k,
        settings.token_routing,
        settings.allow_request_routing,
        settings.substitution_available,
    )
    preprocessor = Preprocessor(
        settings.model_path, settings.limits, bounds, settings.request_workers, max_pending=engine.capacity
    )
    monitor = ExpertLoadMonitor(served.num_layers, served.num_experts, settings.expert_window_s)
    metrics = ServerMetrics(
        settings.model_name,
        served,
        engine.info.max_model_len,
        monitor,
        settings.per_expert_series,
        model_info(engine, settings),
        engine.info.weight_bytes,
        engine.info.released_expert_bytes,
        startup=lambda: (engine.compile_seconds, engine.warmup_seconds),
    )
    observers: list[EngineObserver] = [metrics, monitor]
    engine.observers += [SourceIdObserver(source, observers)] if source else observers

    def stop(grace: float) -> None:
        preprocessor.shutdown()
        engine.shutdown(grace, settings.shutdown_grace_s + 10)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await asyncio.to_thread(stop, 0.0)

    app = FastAPI(
        title="moe-serve",
        summary="OpenAI-compatible serving of Mixture-of-Experts models, with expert-load metrics.",
        version="0.1.0",
        lifespan=lifespan,
    )
    # Refuse new requests, give in-flight ones the grace period, abort the rest (their streams end with an error
    # event) and stop the engine: called as soon as the HTTP server starts shutting down.
    app.state.drain = lambda: stop(settings.shutdown_grace_s)
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(
        ServerMiddleware,
        api_key=settings.api_key,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
        allowed_hosts=settings.allowed_hosts,
        count=lambda method, route, status: metrics.observe_http(method, route, status),
        access_log=settings.access_log,
    )
    control = RoutingControl(engine, bounds, metrics, settings.live_pruning, settings.pruning_labels)
    preprocessor.default_routing = lambda: control.routing
    _add_health_routes(app, engine, metrics)
    _add_generation_routes(app, engine, settings, preprocessor)
    _add_expert_routes(app, engine, settings, metrics, monitor, lambda: control.plan_labels, served.num_experts)
    if settings.enable_admin_api:
        add_admin_routes(app, control)
    return app


def _add_health_routes(app: FastAPI, engine: AsyncEngine, metrics: ServerMetrics) -> None:
    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health() -> Any:
        """Alive: the engine process runs and has been heard from within its heartbeat bound (answered at once,
        without asking the engine)."""
        state = engine.health()
        body = HealthResponse(status=state.status, engine_silent_s=round(state.seconds_since_heard, 3))
        return body if state.healthy else JSONResponse(body.model_dump(), status_code=503)

    @app.get("/ready", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def ready() -> Any:
        """Ready: the model is loaded and warmed up, and the engine is healthy."""
        state = engine.health()
        silent = round(state.seconds_since_heard, 3)
        if not state.healthy or not engine.ready.is_set():
            status = state.status if not state.healthy else "warming up"
            return JSONResponse(HealthResponse(status=status, engine_silent_s=silent).model_dump(), status_code=503)
        return HealthResponse(status="ready", engine_silent_s=silent)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus_metrics() -> Response:
        """Prometheus text exposition: serving metrics and expert load."""
        await engine.refresh()
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _add_generation_routes(
    app: FastAPI, engine: AsyncEngine, settings: ServerSettings, preprocessor: Preprocessor
) -> None:
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


UNPRUNED = {"prune_method": "", "prune_level": "0", "prune_plan": ""}


def _add_expert_routes(
    app: FastAPI,
    engine: AsyncEngine,
    settings: ServerSettings,
    metrics: ServerMetrics,
    monitor: ExpertLoadMonitor,
    pruning_now: Callable[[], dict[str, str]],
    num_experts: int,
) -> None:
    config = engine.model_config
    started_at = time.time()

    def period(counts: np.ndarray, read: np.ndarray, tokens: np.ndarray, since: float) -> LoadPeriod:
        layers = metrics.moe_layers
        balances = layer_balance(counts)
        forwards = read.sum(axis=1)
        mean_read = (read * np.arange(read.shape[1])).sum(axis=1) / np.maximum(forwards, 1)
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
                    experts_read_per_step=float(mean_read[layer]) if forwards[layer] else None,
                    experts_per_token=float(counts[layer].sum() / tokens[layer]) if tokens[layer] else None,
                )
            )
        slots = int(counts[layers].sum())
        return LoadPeriod(since=since, total_routed_slots=slots, total_routed=slots, layers=rows)

    @app.get("/v1/experts/load", response_model=ExpertLoadResponse, responses=AUTH_ERRORS)
    async def expert_load() -> ExpertLoadResponse:
        """Routed-token counts per MoE layer and expert since start and since the last reset, with balance."""
        await engine.refresh()
        since_reset, read_since_reset, tokens_since_reset, reset_at = monitor.since_reset()
        balancing = config.router_balancing
        return ExpertLoadResponse(
            model=settings.model_name,
            balancing_method=balancing.method if balancing else "unknown",
            num_experts=num_experts,
            top_k=config.top_k,
            experts_per_token=int(settings.pruning_labels.get("top_k_override") or config.top_k),
            pruning={key: pruning_now().get(key, unset) for key, unset in UNPRUNED.items()},
            since_start=period(monitor.totals(), monitor.experts_read(), monitor.tokens(), started_at),
            since_reset=period(since_reset, read_since_reset, tokens_since_reset, reset_at),
        )

    @app.post("/v1/experts/load/reset", response_model=ExpertLoadResponse, responses=AUTH_ERRORS)
    async def reset_expert_load() -> ExpertLoadResponse:
        """Start a new since-reset period (Prometheus counters keep counting from start)."""
        await engine.refresh()
        monitor.reset()
        return await expert_load()
