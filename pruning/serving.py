"""Pruning chosen at server start: a level and method (plan computed, or read from the cache), a plan file, a
routing threshold, a top-k override and batch-aware substitution (whose similarity maps come from the cached
calibration), merged into one routing policy per MoE layer, plus the requests' default routing budget."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine.checkpoint import load_model
from engine.config import ModelConfig
from engine.device import resolve_device, resolve_dtype
from engine.routing import RoutingPolicy
from engine.token_routing import TokenRouting
from pruning.cache import DEFAULT_CACHE_DIR, cached_calibration, cached_plan, plan_file
from pruning.methods import METHODS, experts_to_remove
from pruning.plan import PlanError, PruningPlan
from pruning.spec import CalibrationSpec, PlanSpec


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
    # Batch-aware substitution of generated tokens' slots beyond the first substitution_keep_top (None: off),
    # to experts at least substitution_min_similarity alike (engine.routing).
    substitution_keep_top: int | None = None
    substitution_min_similarity: float = 0.5
    substitution_drop_unmatched: bool = False
    # Load the similarity maps even without a default substitution, so requests can ask for one.
    similarity_maps: bool = False
    # Calibrate plans and similarity maps on these UTF-8 files instead of the corpus's validation split: text
    # like the served traffic (pes adapts to its calibration text more than the baselines; docs/pruning.md).
    calibration_files: tuple[Path, ...] = ()
    calibration_tokens: int = CalibrationSpec.max_tokens  # the calibration text's token budget

    def __post_init__(self) -> None:
        if self.plan_file is not None and self.level:
            raise PlanError("give either a pruning level or a plan file, not both")
        missing = [str(f) for f in self.calibration_files if not Path(f).is_file()]
        if missing:
            raise PlanError(f"calibration files not found: {', '.join(missing)}")
        if self.calibration_tokens < 1:
            raise PlanError(f"the calibration token budget must be positive, got {self.calibration_tokens}")
        if not 0.0 <= self.level < 1.0:
            raise PlanError(f"the pruning level must be in [0, 1), got {self.level}")
        if self.top_k is not None and self.top_k < 1:
            raise PlanError(f"experts per token must be at least 1, got {self.top_k}")
        if not 0.0 <= self.route_threshold < 1.0:
            raise PlanError(f"the routing threshold must be in [0, 1), got {self.route_threshold}")
        if not -1.0 <= self.substitution_min_similarity <= 1.0:
            raise PlanError(
                f"the substitution's minimum similarity must be in [-1, 1], got {self.substitution_min_similarity}"
            )
        try:
            self.plan_spec()
        except ValueError as error:
            raise PlanError(str(error)) from None

    @property
    def active(self) -> bool:
        return bool(self.level or self.plan_file or self.route_threshold or self.top_k or self.wants_similarity)

    @property
    def wants_similarity(self) -> bool:
        return self.substitution_keep_top is not None or self.similarity_maps

    def token_routing(self) -> TokenRouting:
        """Every request's routing budget unless it brings its own."""
        return TokenRouting(keep_top=self.substitution_keep_top, min_similarity=self.substitution_min_similarity)

    def resolve(
        self,
        model_dir: Path,
        device: str = "auto",
        dtype: str = "auto",
        cache_dir: Path = DEFAULT_CACHE_DIR,
        spec: CalibrationSpec | None = None,
    ) -> tuple[dict[int, RoutingPolicy], PruningPlan | None]:
        """The engine's routing policies, and the plan they came from (read, cached, or made now); plans and
        similarity maps calibrate on `spec` (default: the calibration files, else the corpus's validation split)."""
        spec = spec or self.calibration()
        config = ModelConfig.from_dir(model_dir)
        self.check(config)
        plan = self.plan(model_dir, device, dtype, cache_dir, spec)
        base = plan.routing_policies() if plan is not None else {}
        similarity = (
            self._similarity_maps(model_dir, config, device, dtype, cache_dir, spec) if self.wants_similarity else {}
        )
        policies = {
            layer: replace(
                base.get(layer, RoutingPolicy()),
                min_prob=self.route_threshold,
                top_k=self.top_k,
                similarity=similarity.get(layer),
                drop_unmatched=self.substitution_drop_unmatched,
            )
            for layer in config.moe_layers
        }
        return ({} if not self.active else policies), plan

    def calibration(self) -> CalibrationSpec:
        """What plans and similarity maps calibrate on."""
        return CalibrationSpec(files=tuple(self.calibration_files), max_tokens=self.calibration_tokens)

    def plan_spec(self, calibration: CalibrationSpec | None = None) -> PlanSpec:
        """The plan the level and method ask for, chosen on `calibration` (default: the settings' own)."""
        return PlanSpec(
            self.method, self.level, self.budget, self.handling, calibration=calibration or self.calibration()
        )

    def plan_source(self, model_dir: Path, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path | None:
        """The file the plan is read from: the plan file, or its place in the cache (cache_plan's)."""
        if self.plan_file is not None:
            return self.plan_file
        if not self.level:
            return None
        return plan_file(model_dir, self.plan_spec(), cache_dir)

    def check(self, config: ModelConfig) -> None:
        """PlanError naming what this model cannot serve, before any calibration or loading."""
        if self.level:
            try:
                experts_to_remove(config.num_experts, config.top_k, self.level)
            except ValueError as error:
                raise PlanError(str(error)) from None
        if self.top_k is not None and self.top_k > config.num_experts:
            raise PlanError(
                f"experts per token must be at most the model's {config.num_experts} experts, got {self.top_k}"
            )

    def plan(
        self,
        model_dir: Path,
        device: str = "auto",
        dtype: str = "auto",
        cache_dir: Path = DEFAULT_CACHE_DIR,
        spec: CalibrationSpec | None = None,
    ) -> PruningPlan | None:
        """The plan file's plan (checked against the model), the cached plan for the level and method (made
        now, calibrating on `spec`, if there is none), or None when nothing is pruned."""
        if self.plan_file is not None:
            plan = PruningPlan.load(self.plan_file)
            plan.check_model(model_dir)
            return plan
        if not self.level:
            return None
        plan_spec = self.plan_spec(spec)
        cached = plan_file(model_dir, plan_spec, cache_dir)
        if cached.is_file():  # without loading the model: a live switch to a prepared plan takes milliseconds
            return PruningPlan.load(cached)
        where = resolve_device(device)
        with torch.no_grad():
            model = load_model(model_dir, resolve_dtype(dtype, where), where).eval()
            return cached_plan(model_dir, model, plan_spec, cache_dir)

    @staticmethod
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
            "substitution": ""
            if self.substitution_keep_top is None
            else f"keep_top={self.substitution_keep_top},min_similarity={self.substitution_min_similarity:g}"
            + (",drop_unmatched" if self.substitution_drop_unmatched else ""),
        }


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
        plan = self.settings.plan(self.model_dir, self.device, self.dtype)
        return (plan.routing_policies() if plan is not None else {}), plan
