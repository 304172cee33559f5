"""The expert-load API: routed-token counts per layer and expert, their balance, and the pruning in force."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from fastapi import FastAPI

from server.async_engine import AsyncEngine
from server.expert_load import ExpertLoadMonitor, layer_balance
from server.metrics import ServerMetrics
from server.openapi import AUTH_ERRORS
from server.protocol import ExpertLoadResponse, LayerLoad, LoadPeriod
from server.settings import ServerSettings

UNPRUNED = {"prune_method": "", "prune_level": "0", "prune_plan": ""}


def add_expert_routes(
    app: FastAPI,
    engine: AsyncEngine,
    settings: ServerSettings,
    metrics: ServerMetrics,
    monitor: ExpertLoadMonitor,
    pruning_now: Callable[[], dict[str, str]],
    num_experts: int,
) -> None:
    """GET /v1/experts/load and POST /v1/experts/load/reset."""
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
