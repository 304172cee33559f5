"""Pruning chosen at server start: a level and method (plan computed, or read from the cache), a plan file, a
routing threshold and a top-k override, merged into one routing policy per MoE layer for the engine."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine.checkpoint import load_model
from engine.config import ModelConfig
from engine.llm_engine import resolve_device, resolve_dtype
from engine.routing import RoutingPolicy
from pruning.cache import DEFAULT_CACHE_DIR, cached_plan
from pruning.plan import PlanError, PruningPlan


@dataclass(frozen=True)
class PruningSettings:
    """What the user asked for; all defaults serve the model as trained."""

    level: float = 0.0
    method: str = "pes"
    budget: str = "uniform"
    handling: str = "repick"
    plan_file: Path | None = None
    route_threshold: float = 0.0
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.plan_file is not None and self.level:
            raise PlanError("give either a pruning level or a plan file, not both")
        if not 0.0 <= self.route_threshold < 1.0:
            raise PlanError(f"the routing threshold must be in [0, 1), got {self.route_threshold}")

    @property
    def active(self) -> bool:
        return bool(self.level or self.plan_file or self.route_threshold or self.top_k)

    def resolve(
        self, model_dir: Path, device: str = "auto", dtype: str = "auto", cache_dir: Path = DEFAULT_CACHE_DIR
    ) -> tuple[dict[int, RoutingPolicy], PruningPlan | None]:
        """The engine's routing policies, and the plan they came from (read, cached, or made now)."""
        config = ModelConfig.from_dir(model_dir)
        plan = None
        if self.plan_file is not None:
            plan = PruningPlan.load(self.plan_file)
            plan.check_model(model_dir)
        elif self.level:
            where = resolve_device(device)
            with torch.no_grad():
                model = load_model(model_dir, resolve_dtype(dtype, where), where, config).eval()
                plan = cached_plan(
                    model_dir, model, self.method, self.level, self.budget, self.handling, cache_dir=cache_dir
                )
            del model
        base = plan.routing_policies() if plan is not None else {}
        layers = [layer for layer in range(config.num_layers) if config.is_moe_layer(layer)]
        policies = {
            layer: replace(base.get(layer, RoutingPolicy()), min_prob=self.route_threshold, top_k=self.top_k)
            for layer in layers
        }
        return ({} if not self.active else policies), plan

    def labels(self, plan: PruningPlan | None) -> dict[str, str]:
        """The settings as metric labels (empty strings where unset)."""
        return {
            "prune_method": plan.method if plan else "",
            "prune_level": f"{plan.level:g}" if plan else "0",
            "prune_budget": plan.budget if plan else "",
            "prune_handling": plan.handling if plan else "",
            "prune_plan": str(self.plan_file or ""),
            "route_threshold": f"{self.route_threshold:g}",
            "top_k_override": str(self.top_k or ""),
        }
