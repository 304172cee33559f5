"""Pruning chosen at server start (pruning/settings.py) resolved for the engine: a level and method (plan computed,
or read from the cache), a plan file, a routing threshold, a top-k override and batch-aware substitution (whose
similarity maps come from the cached calibration), merged into one routing policy per MoE layer; and the pruning
a running server switches live."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine.checkpoint import load_model
from engine.config import ModelConfig
from engine.device import resolve_device, resolve_dtype
from engine.routing import RoutingPolicy
from pruning.cache import DEFAULT_CACHE_DIR, cached_calibration, cached_plan, plan_file
from pruning.methods import METHODS
from pruning.plan import PlanError, PruningPlan
from pruning.settings import PruningSettings
from pruning.spec import CalibrationSpec


def resolve(
    settings: PruningSettings,
    model_dir: Path,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: Path = DEFAULT_CACHE_DIR,
    spec: CalibrationSpec | None = None,
) -> tuple[dict[int, RoutingPolicy], PruningPlan | None]:
    """The engine's routing policies under `settings`, and the plan they came from (read, cached, or made now); plans and
    similarity maps calibrate on `spec` (default: the calibration files, else the corpus's validation split)."""
    spec = spec or settings.calibration()
    config = ModelConfig.from_dir(model_dir)
    settings.check(config)
    plan = plan_for(settings, model_dir, device, dtype, cache_dir, spec)
    base = plan.routing_policies() if plan is not None else {}
    similarity = (
        _similarity_maps(model_dir, config, device, dtype, cache_dir, spec) if settings.wants_similarity else {}
    )
    policies = {
        layer: replace(
            base.get(layer, RoutingPolicy()),
            min_prob=settings.route_threshold,
            top_k=settings.top_k,
            similarity=similarity.get(layer),
            drop_unmatched=settings.substitution_drop_unmatched,
        )
        for layer in config.moe_layers
    }
    return ({} if not settings.active else policies), plan


def plan_source(settings: PruningSettings, model_dir: Path, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path | None:
    """The file the settings' plan is read from: the plan file, or its place in the cache (cache_plan's)."""
    if settings.plan_file is not None:
        return settings.plan_file
    if not settings.level:
        return None
    return plan_file(model_dir, settings.plan_spec(), cache_dir)


def plan_for(
    settings: PruningSettings,
    model_dir: Path,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: Path = DEFAULT_CACHE_DIR,
    spec: CalibrationSpec | None = None,
) -> PruningPlan | None:
    """The settings' plan: the plan file's plan (checked against the model), the cached plan for the level and method (made
    now, calibrating on `spec`, if there is none), or None when nothing is pruned."""
    if settings.plan_file is not None:
        plan = PruningPlan.load(settings.plan_file)
        plan.check_model(model_dir)
        return plan
    if not settings.level:
        return None
    plan_spec = settings.plan_spec(spec)
    cached = plan_file(model_dir, plan_spec, cache_dir)
    if cached.is_file():  # without loading the model: a live switch to a prepared plan takes milliseconds
        return PruningPlan.load(cached)
    where = resolve_device(device)
    with torch.no_grad():
        model = load_model(model_dir, resolve_dtype(dtype, where), where).eval()
        return cached_plan(model_dir, model, plan_spec, cache_dir)


def _similarity_maps(
    model_dir: Path, config: ModelConfig, device: str, dtype: str, cache_dir: Path, spec: CalibrationSpec
) -> dict[int, torch.Tensor]:
    """Each MoE layer's expert similarity (PES's pairwise map) from the cached calibration, made now if
    there is none."""
    where = resolve_device(device)
    with torch.no_grad():
        model = load_model(model_dir, resolve_dtype(dtype, where), where, config).eval()
        calibration = cached_calibration(model_dir, model, spec, cache_dir)
    del model
    return {layer.layer: torch.from_numpy(layer.similarity).float() for layer in calibration.layers}


@dataclass(frozen=True)
class LivePruning:
    """A running server's pruning (its start-up settings with the level, method or plan file switched live)
    and the routing that serves it."""

    settings: PruningSettings
    model_dir: Path
    device: str = "auto"
    dtype: str = "auto"

    def switched(self, level: float | None, method: str | None, plan_file: Path | None) -> LivePruning:
        """These settings with the given fields replaced (a level replaces a plan file and the other way round);
        PlanError naming the field that cannot be."""
        if level is not None and plan_file is not None:
            raise PlanError("give either prune_level or prune_plan, not both")
        if level is not None and not 0.0 <= level < 1.0:
            raise PlanError(f"prune_level must be in [0, 1), got {level}")
        if method is not None and method not in METHODS:
            raise PlanError(f"prune_method must be one of {sorted(METHODS)}, got {method!r}")
        settings = self.settings
        if level is not None:
            settings = replace(settings, level=level, plan_file=None)
        if plan_file is not None:
            settings = replace(settings, level=0.0, plan_file=plan_file)
        if method is not None:
            settings = replace(settings, method=method)
        settings.check(ModelConfig.from_dir(self.model_dir))
        return replace(self, settings=settings)

    def policies(self) -> tuple[dict[int, RoutingPolicy], PruningPlan | None]:
        """Each MoE layer's kept experts and redirects under these settings (what the engine's live pruning
        tables take), and the plan they come from; making an uncached plan calibrates first (minutes)."""
        plan = plan_for(self.settings, self.model_dir, self.device, self.dtype)
        return (plan.routing_policies() if plan is not None else {}), plan
