"""Which experts to remove: the baselines, each as its authors define it, ranked from calibration.

A pruning level is the fraction of a layer's routed experts removed; every layer keeps at least top_k.
- `frequency`: least-routed experts first (tokens that picked them among their top-k on calibration text).
- `reap`: REAP's saliency, lowest first: the mean over tokens routed to an expert of its gate weight times the
  norm of its output.
- `random`: a seeded shuffle, the floor any method must beat.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.model import MoEForCausalLM
from pruning.calibration import Calibration, LayerCalibration
from pruning.choices import BASELINES, BUDGETS, HANDLINGS, METHODS
from pruning.redundancy import LayerReplay, layer_budgets, redirect_targets, removal_path


def removal_order(method: str, layer: LayerCalibration, seed: int = 0) -> list[int]:
    """A layer's expert ids, the first to remove first (ties broken by expert id)."""
    experts = np.arange(len(layer.routed_tokens))
    if method == "frequency":
        score = layer.routed_tokens.astype(np.float64)
    elif method == "reap":
        score = layer.reap_saliency
    elif method == "random":
        score = np.random.default_rng([seed, layer.layer]).permutation(len(experts)).astype(np.float64)
    else:
        raise ValueError(f"unknown pruning method {method!r}; expected one of {', '.join(BASELINES)}")
    return [int(e) for e in np.lexsort((experts, score))]


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


@dataclass(frozen=True)
class Selection:
    """What a method removes: per MoE layer the removed experts (removal order) and, when redirecting, where
    each removed expert's slots go."""

    removed: dict[int, list[int]]
    redirect: dict[int, dict[int, int]]


def select(
    method: str,
    calibration: Calibration,
    model: MoEForCausalLM,
    level: float,
    budget: str = "uniform",
    handling: str = "repick",
    seed: int = 0,
) -> Selection:
    """The experts `method` removes at `level`. `budget="adaptive"` (pes only) spreads the same total over layers
    by measured cost instead of the same count per layer; `handling` says where removed experts' tokens go."""
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; expected one of {', '.join(METHODS)}")
    if budget not in BUDGETS or handling not in HANDLINGS:
        raise ValueError(f"budget must be one of {BUDGETS} and handling one of {HANDLINGS}")
    if budget == "adaptive" and method != "pes":
        raise ValueError(f"the adaptive budget needs the pes method's costs; {method!r} prunes uniformly")
    top_k = model.config.top_k
    count = experts_to_remove(model.config.num_experts, top_k, level)
    if method != "pes":
        removed = {layer.layer: removal_order(method, layer, seed)[:count] for layer in calibration.layers}
    else:
        blocks = {block.layer_idx: block for block in model.moe_blocks()}
        depth = model.config.num_experts - top_k if budget == "adaptive" else count
        paths = {
            layer.layer: removal_path(
                LayerReplay.of(blocks[layer.layer], layer.inputs), layer.similarity, depth, handling
            )
            for layer in calibration.layers
        }
        counts = layer_budgets(paths, count * len(paths)) if budget == "adaptive" else dict.fromkeys(paths, count)
        removed = {layer: [e for e, _ in path[: counts[layer]]] for layer, path in paths.items()}
    redirect = {}
    if handling == "redirect":
        similarity = {layer.layer: layer.similarity for layer in calibration.layers}
        redirect = {
            layer: redirect_targets(similarity[layer], experts) for layer, experts in removed.items() if experts
        }
    return Selection(removed, redirect)
