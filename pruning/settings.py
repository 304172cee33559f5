"""What a user asks of pruning at server start (a level and method or a plan file, a routing threshold, a top-k
override, batch-aware substitution, the calibration text), checked when made. Torch-free, so that `moe-serve`
refuses settings that cannot be served, and those this model cannot serve (its config.json only), before it
starts anything: pruning/serving.py resolves them to routing policies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.token_routing import TokenRouting
from pruning.methods import experts_to_remove
from pruning.spec import CalibrationSpec, PlanError, PlanSpec

if TYPE_CHECKING:
    from engine.config import ModelConfig
    from pruning.plan import PruningPlan


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
        if self.plan_file is not None and not Path(self.plan_file).is_file():
            raise PlanError(f"{self.plan_file}: plan file does not exist")
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

    def calibration(self) -> CalibrationSpec:
        """What plans and similarity maps calibrate on."""
        return CalibrationSpec(files=tuple(self.calibration_files), max_tokens=self.calibration_tokens)

    def plan_spec(self, calibration: CalibrationSpec | None = None) -> PlanSpec:
        """The plan the level and method ask for, chosen on `calibration` (default: the settings' own)."""
        return PlanSpec(
            self.method, self.level, self.budget, self.handling, calibration=calibration or self.calibration()
        )

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
