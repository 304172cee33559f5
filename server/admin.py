"""The admin API, off unless the server is started with --enable-admin-api (and behind the API key when one is
set): read the routing budget that requests without a `moe` field run under, and switch it live.

A switch goes to the engine process as a typed message and takes effect at its next step boundary, for the
requests in flight too (no request is dropped, nothing recompiles: the budget is per-token data). Switches are
serialized; a refused one changes nothing. Each change increments a generation number, reported here and in
`moe_serve_routing_config_info`, so dashboards can draw the switch.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI

from engine.token_routing import TokenRouting
from server.async_engine import AsyncEngine
from server.errors import APIError
from server.metrics import ServerMetrics
from server.openapi import ADMIN_ERRORS
from server.preprocess import ModelBounds, merged_routing
from server.protocol import RoutingSetting, RoutingUpdate, Substitution

NOT_LIVE = ("prune_level", "prune_method", "prune_plan")


class RoutingControl:
    """The server's current default routing budget and its generation; switches one at a time."""

    def __init__(self, engine: AsyncEngine, bounds: ModelBounds, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.bounds = bounds
        self.metrics = metrics
        self.routing = bounds.routing
        self.generation = 0
        self._lock = asyncio.Lock()
        metrics.routing_changed(self.routing, self.generation)

    def setting(self) -> RoutingSetting:
        routing = self.routing
        substitution = None
        if routing.keep_top is not None:
            substitution = Substitution(keep_top=routing.keep_top, min_similarity=routing.min_similarity)
        return RoutingSetting(
            generation=self.generation,
            route_threshold=routing.min_prob,
            experts_per_token=routing.experts_per_token,
            substitution=substitution,
        )

    async def switch(self, update: RoutingUpdate) -> RoutingSetting:
        """Apply the update from the engine's next step on (APIError 400 naming the field if it cannot be)."""
        for name in NOT_LIVE:
            if name in update.model_fields_set:
                raise APIError(
                    400, f"{name} cannot change on a running server yet; restart it with --{name.replace('_', '-')}",
                    param=name,
                )  # fmt: skip
        async with self._lock:
            routing: TokenRouting = merged_routing(self.routing, update, self.bounds)
            try:
                await self.engine.set_routing(routing)
            except ValueError as exc:
                raise APIError(400, str(exc), param="routing") from exc
            self.routing = routing
            self.generation += 1
            self.metrics.routing_changed(routing, self.generation)
            return self.setting()


def add_admin_routes(app: FastAPI, control: RoutingControl) -> None:
    @app.get("/v1/routing", response_model=RoutingSetting, responses=ADMIN_ERRORS)
    async def get_routing() -> RoutingSetting:
        """The routing budget requests without a `moe` field run under, and its generation."""
        return control.setting()

    @app.post("/v1/routing", response_model=RoutingSetting, responses=ADMIN_ERRORS)
    async def set_routing(update: RoutingUpdate) -> RoutingSetting:
        """Change the routing budget from the engine's next step on; the fields given replace the current ones
        (`substitution: null` turns substitution off)."""
        return await control.switch(update)
