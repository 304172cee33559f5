"""Which experts to remove: every pruning method, one table. Adding a method is one selector here and one line
in METHODS (a ranking baseline: one score function and one line in RANKINGS).

A pruning level is the fraction of a layer's routed experts removed; every layer keeps at least top_k.
- `pes`: the removals that change the layer's replayed output least (pruning/redundancy.py); the only method
  whose costs can also spread the total over layers (the adaptive budget).
- `frequency`: least-routed experts first (tokens that picked them among their top-k on calibration text).
- `reap`: REAP's saliency, lowest first: the mean over tokens routed to an expert of its gate weight times the
  norm of its output.
- `random`: a seeded shuffle, the floor any method must beat.
- `pes-token`: pes with each token's output error relative to its own output's size (every token counts alike,
  not in proportion to its output's energy); measured against pes off the calibration distribution in
  docs/pruning.md, uniform budget only.

This module does not import torch (pes imports its replay when it runs), so command lines take their
`--prune-method` choices from METHODS and still answer `--help` without loading torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from pruning.choices import BUDGETS

if TYPE_CHECKING:
    from engine.model import MoEForCausalLM
    from pruning.calibration import Calibration, LayerCalibration

Removed = dict[int, list[int]]  # MoE layer -> removed experts, the first removed first
Score = Callable[["LayerCalibration", int], np.ndarray]  # an expert score per layer (and seed); lowest goes first


class MethodOptions(Protocol):
    """What a selector reads of the plan it selects for (a PlanSpec)."""

    @property
    def budget(self) -> str: ...

    @property
    def handling(self) -> str: ...

    @property
    def seed(self) -> int: ...


Selector = Callable[["Calibration", "MoEForCausalLM", int, MethodOptions], Removed]


@dataclass(frozen=True)
class Method:
    """A pruning method: the experts it removes given the count per layer, and the budgets it can spread that
    count by (the uniform one: the same count in every layer)."""

    select: Selector
    budgets: tuple[str, ...] = ("uniform",)


def frequency_score(layer: LayerCalibration, seed: int) -> np.ndarray:
    return layer.routed_tokens.astype(np.float64)


def reap_score(layer: LayerCalibration, seed: int) -> np.ndarray:
    return layer.reap_saliency


def random_score(layer: LayerCalibration, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, layer.layer]).permutation(len(layer.routed_tokens)).astype(np.float64)


RANKINGS: dict[str, Score] = {"frequency": frequency_score, "reap": reap_score, "random": random_score}


def removal_order(method: str, layer: LayerCalibration, seed: int = 0) -> list[int]:
    """A layer's expert ids under a ranking method, the first to remove first (ties broken by expert id)."""
    if method not in RANKINGS:
        raise ValueError(f"unknown pruning method {method!r}; expected one of {', '.join(RANKINGS)}")
    score = RANKINGS[method](layer, seed)
    return [int(e) for e in np.lexsort((np.arange(len(score)), score))]


@dataclass(frozen=True)
class LowestRanked:
    """A ranking method's selector: each layer's `count` first experts in its removal order."""

    method: str

    def __call__(self, calibration: Calibration, model: MoEForCausalLM, count: int, options: MethodOptions) -> Removed:
        return {layer.layer: removal_order(self.method, layer, options.seed)[:count] for layer in calibration.layers}


@dataclass(frozen=True)
class LeastOutputChange:
    """pes's selector: per layer the greedy removal path by replayed output error (per token relative when
    `per_token`); the adaptive budget takes the same total as the cheapest removals of any layer."""

    per_token: bool = False

    def __call__(self, calibration: Calibration, model: MoEForCausalLM, count: int, options: MethodOptions) -> Removed:
        from pruning.redundancy import LayerReplay, layer_budgets, removal_path  # torch, needed only when pes runs

        blocks = {block.layer_idx: block for block in model.moe_blocks()}
        adaptive = options.budget == "adaptive"
        depth = model.config.num_experts - model.config.top_k if adaptive else count
        paths = {
            layer.layer: removal_path(
                LayerReplay.of(blocks[layer.layer], layer.inputs),
                layer.similarity,
                depth,
                options.handling,
                self.per_token,
            )
            for layer in calibration.layers
        }
        counts = layer_budgets(paths, count * len(paths)) if adaptive else dict.fromkeys(paths, count)
        return {layer: [e for e, _ in path[: counts[layer]]] for layer, path in paths.items()}


METHODS: dict[str, Method] = {
    "pes": Method(LeastOutputChange(), budgets=BUDGETS),
    **{name: Method(LowestRanked(name)) for name in RANKINGS},
    "pes-token": Method(LeastOutputChange(per_token=True)),
}


def experts_to_remove(num_experts: int, top_k: int, level: float) -> int:
    """How many of a layer's experts a level removes: round(level x E), never leaving fewer than top_k."""
    if not 0.0 <= level < 1.0:
        raise ValueError(f"pruning level must be in [0, 1), got {level}")
    count = round(level * num_experts)
    if num_experts - count < top_k:
        raise ValueError(
            f"level {level} removes {count} of {num_experts} experts, leaving fewer than top_k={top_k}; "
            f"the highest level this model allows is {(num_experts - top_k) / num_experts:g}"
        )
    return count
