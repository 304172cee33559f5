"""The FastAPI application: OpenAI-compatible generation, health, metrics and expert load over one engine.

A request's path: the middleware checks host, key and body size; the route reads the body and hands it to
a request worker (server/preprocess.py), which parses, validates, renders and tokenizes it off the event loop;
the completion or chat service admits it to the AsyncEngine (the engine process batches it with every other
live request) and turns the outputs into a response or a stream of server-sent events; the metrics observer
watches each engine step. Routes live by group: server/health_routes.py, generation_routes.py,
expert_routes.py and admin.py; this file wires them to one engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI

from server.admin import RoutingControl, add_admin_routes
from server.async_engine import AsyncEngine, EngineObserver
from server.errors import install_error_handlers
from server.expert_load import ExpertLoadMonitor
from server.expert_routes import add_expert_routes
from server.generation_routes import add_generation_routes
from server.health_routes import add_health_routes
from server.metrics import ServerMetrics, rank_owners
from server.middleware import ServerMiddleware
from server.openapi import install_openapi
from server.preprocess import ModelBounds, Preprocessor
from server.settings import ServerSettings
from server.source_experts import SourceExperts, SourceIdObserver


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
    bounds = model_bounds(engine, settings)
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
        startup=lambda: (engine.compile_seconds, engine.warmup_seconds),
        expert_weight_bytes=engine.info.expert_weight_bytes,
        rank_owners=None if source else rank_owners(served, settings.expert_placement),
    )
    observers: list[EngineObserver] = [metrics, monitor]
    engine.observers += [SourceIdObserver(source, observers)] if source else observers

    def stop(grace: float) -> None:
        preprocessor.shutdown()
        engine.shutdown(grace, settings.shutdown_grace_s + 10)

    app = _fastapi(settings, metrics, stop)
    control = RoutingControl(engine, bounds, metrics, settings.live_pruning, settings.pruning_labels)
    preprocessor.default_routing = lambda: control.routing
    add_health_routes(app, engine, metrics)
    add_generation_routes(app, engine, settings, preprocessor)
    add_expert_routes(app, engine, settings, metrics, monitor, lambda: control.plan_labels, served.num_experts)
    if settings.enable_admin_api:
        add_admin_routes(app, control)
    return app


def model_bounds(engine: AsyncEngine, settings: ServerSettings) -> ModelBounds:
    """What requests are checked against: the model's vocabulary, length, capacity and routing limits."""
    config = engine.model_config
    return ModelBounds(
        settings.model_name,
        config.vocab_size,
        engine.info.max_model_len,
        engine.capacity,
        config.top_k,
        settings.token_routing,
        settings.allow_request_routing,
        settings.substitution_available,
    )


def _fastapi(settings: ServerSettings, metrics: ServerMetrics, stop: Callable[[float], None]) -> FastAPI:
    """The bare app: lifespan, draining, error handlers, OpenAPI document and the middleware, no routes."""

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
    return app
