"""What pruning costs: test-split perplexity per method and level, the routing-threshold sweep of the SimBal
paper's Table 6 (perplexity and measured speed), and its dropped-top-experts redundancy test (Fig. 4).

Every setting runs as routing policies on the one loaded model, so the rows of a model differ only in routing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.model import MoEForCausalLM
from engine.routing import RoutingPolicy
from measures.perplexity import perplexity
from pruning.calibration import Calibration
from pruning.plan import make_plan
from pruning.spec import CalibrationSpec, PlanSpec


@dataclass(frozen=True)
class Variant:
    """One way of pruning: a method with its budget and its handling of removed experts' tokens."""

    method: str
    budget: str = "uniform"
    handling: str = "repick"

    @property
    def name(self) -> str:
        extras = [x for x in (self.budget, self.handling) if x not in ("uniform", "repick")]
        return "+".join([self.method, *extras])

    @classmethod
    def parse(cls, text: str) -> Variant:
        """ "pes", "pes+adaptive", "pes+redirect", "pes+adaptive+redirect", "reap", ..."""
        method, *extras = text.split("+")
        unknown = set(extras) - {"adaptive", "redirect"}
        if unknown:
            raise ValueError(f"{text!r}: unknown variant {sorted(unknown)}; expected +adaptive and/or +redirect")
        return cls(
            method, "adaptive" if "adaptive" in extras else "uniform", "redirect" if "redirect" in extras else "repick"
        )

    def __post_init__(self) -> None:
        self.plan_spec(0.0)  # refuses what no plan can be made with (an unknown method ...) before any model loads

    def plan_spec(self, level: float, seed: int = 0, calibration: CalibrationSpec | None = None) -> PlanSpec:
        """This variant's plan at `level`, chosen on `calibration` (default: the corpus's validation split)."""
        return PlanSpec(self.method, level, self.budget, self.handling, seed, calibration or CalibrationSpec())


def _scored(model: MoEForCausalLM, windows: torch.Tensor, policies: dict[int, RoutingPolicy]) -> dict[str, Any]:
    model.set_routing_policies(policies)
    model.expert_load.reset()
    try:
        result = perplexity(model, windows)
        load = model.expert_load.snapshot()
    finally:
        model.set_routing_policies({})
    routed = int(load.sum())
    moe_layers = len(model.moe_blocks())
    return {
        "ppl": result.ppl,
        "loss": result.loss,
        "tokens": result.tokens,
        "seconds": result.seconds,
        "tokens_per_s": result.tokens / result.seconds,
        "experts_per_token": routed / (result.tokens * moe_layers),
    }


def pruning_rows(
    model_dir: Path,
    model: MoEForCausalLM,
    calibration: Calibration,
    windows: torch.Tensor,
    variants: list[Variant],
    levels: list[float],
    seed: int = 0,
    calibrated_on: CalibrationSpec | None = None,
) -> Iterator[dict[str, Any]]:
    """Test perplexity of every variant at every level (level 0 is the unpruned model, scored once); the
    calibration was measured on `calibrated_on`."""
    if 0.0 in levels:
        yield {"variant": "none", "method": "none", "level": 0.0, **_scored(model, windows, {})}
    for variant in variants:
        for level in (level for level in levels if level > 0):
            plan = make_plan(model_dir, model, calibration, variant.plan_spec(level, seed, calibrated_on))
            row = {"variant": variant.name, "method": variant.method, "level": level}
            row["kept_per_layer"] = [len(plan.kept[layer]) for layer in sorted(plan.kept)]
            yield {**row, **_scored(model, windows, plan.routing_policies())}


def threshold_rows(model: MoEForCausalLM, windows: torch.Tensor, thresholds: list[float]) -> Iterator[dict[str, Any]]:
    """Dynamic-K routing: each token's routed experts below probability tau are dropped (Table 6)."""
    layers = model.config.moe_layers
    for tau in thresholds:
        yield {"tau": tau, **_scored(model, windows, {layer: RoutingPolicy(min_prob=tau) for layer in layers})}


def dropped_top_rows(model: MoEForCausalLM, windows: torch.Tensor, drops: list[int]) -> Iterator[dict[str, Any]]:
    """Each token's r most probable experts masked, top-k re-picked among the rest (Fig. 4)."""
    layers = model.config.moe_layers
    for r in drops:
        yield {"dropped_top": r, **_scored(model, windows, {layer: RoutingPolicy(skip_top=r) for layer in layers})}
