"""The admin API, off unless the server is started with --enable-admin-api (and behind the API key when one is
set): read the routing budget that requests without a `moe` field run under, and switch it live.

A switch goes to the engine process as a typed message and takes effect at its next step boundary, for the
requests in flight too (no request is dropped, nothing recompiles: the budget is per-token data, and pruning is
the engine's live expert tables). A pruning level or method is served from the cached plan; an uncached one is
made first (calibrating, off the event loop), so a plan prepared with `moe-prune` switches at once. Switches are
serialized; a refused one changes nothing. Each change increments a generation number, reported here and in
`moe_serve_routing_config_info`, so dashboards can draw the switch.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import FastAPI

from corpus.splits import CorpusError
from engine.routing import RoutingPolicy
from engine.token_routing import TokenRouting
from pruning.plan import PlanError
from pruning.serving import LivePruning
from server.async_engine import AsyncEngine
from server.errors import APIError
from server.metrics import ServerMetrics
from server.openapi import ADMIN_ERRORS
from server.preprocess import ModelBounds, merged_routing
from server.protocol import RoutingSetting, RoutingUpdate, Substitution

PRUNING_KEYS = ("prune_level", "prune_method", "prune_plan")


class RoutingControl:
    """The server's current default routing budget, its live pruning and their generation; switches one at a
    time. `pruning` is None when the engine cannot switch pruning live."""

    def __init__(
        self,
        engine: AsyncEngine,
        bounds: ModelBounds,
        metrics: ServerMetrics,
        pruning: LivePruning | None = None,
        plan_labels: dict[str, str] | None = None,
    ) -> None:
        self.engine = engine
        self.bounds = bounds
        self.metrics = metrics
        self.routing = bounds.routing
        self.pruning = pruning
        self.plan_labels = plan_labels or {}  # PruningSettings.labels of the pruning served now
        self.generation = 0
        self._lock = asyncio.Lock()
        metrics.routing_changed(self.routing, self.generation, self.plan_labels)

    def setting(self) -> RoutingSetting:
        routing = self.routing
        substitution = None
        if routing.keep_top is not None:
            substitution = Substitution(keep_top=routing.keep_top, min_similarity=routing.min_similarity)
        labels = self.plan_labels
        return RoutingSetting(
            generation=self.generation,
            route_threshold=routing.min_prob,
            experts_per_token=routing.experts_per_token,
            substitution=substitution,
            prune_level=float(labels.get("prune_level") or 0.0),
            prune_method=labels.get("prune_method") or None,
            prune_plan=labels.get("prune_plan") or None,
        )

    async def switch(self, update: RoutingUpdate) -> RoutingSetting:
        """Apply the update from the engine's next step on (APIError 400 naming the field if it cannot be)."""
        async with self._lock:
            routing: TokenRouting = merged_routing(self.routing, update, self.bounds)
            pruning, policies, labels = self.pruning, None, self.plan_labels
            if any(key in update.model_fields_set for key in PRUNING_KEYS):
                pruning, policies, labels = await self._plan(update)
            try:
                await self.engine.set_routing(routing, policies)
            except ValueError as exc:
                raise APIError(400, str(exc), param="routing") from exc
            self.routing, self.pruning, self.plan_labels = routing, pruning, labels
            self.generation += 1
            self.metrics.routing_changed(routing, self.generation, labels)
            return self.setting()

    async def _plan(self, update: RoutingUpdate) -> tuple[LivePruning, dict[int, RoutingPolicy], dict[str, str]]:
        """The pruning the update asks for and its routing (a cached plan is read; an uncached one calibrates
        first, off the event loop); APIError 400 naming the field that cannot be served."""
        if self.pruning is None:
            raise APIError(400, "this server cannot switch pruning live", param="prune_level")
        fields = update.model_fields_set
        plan_file = update.prune_plan if "prune_plan" in fields else None
        try:
            pruning = self.pruning.switched(
                update.prune_level if "prune_level" in fields else None,
                update.prune_method if "prune_method" in fields else None,
                None if plan_file is None else Path(plan_file),
            )
            policies, plan = await asyncio.to_thread(pruning.policies)
        except (PlanError, CorpusError, OSError, ValueError) as exc:
            named = [key for key in PRUNING_KEYS if key in str(exc)]
            param = named[0] if named else ("prune_plan" if plan_file is not None else "prune_level")
            raise APIError(400, f"cannot prune so: {exc}", param=param) from exc
        return pruning, policies, pruning.settings.labels(plan)


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
