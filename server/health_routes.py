"""Liveness, readiness and the Prometheus scrape: the routes a supervisor and a monitoring stack call."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.async_engine import AsyncEngine
from server.metrics import ServerMetrics
from server.protocol import HealthResponse


def add_health_routes(app: FastAPI, engine: AsyncEngine, metrics: ServerMetrics) -> None:
    """GET /health, /ready and /metrics."""

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
