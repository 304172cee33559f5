"""Expert placement for expert parallelism from measured routing: calibration counts, or a running server's
expert load (a saved `GET /v1/experts/load` answer), packed onto ranks so each gets nearly the same tokens.

`moe-prune place MODEL --ranks N -o placement.json [--load load.json]`, then
`moe-serve MODEL --expert-parallel N --expert-placement placement.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.config import ModelConfig
from engine.expert_placement import (
    ExpertPlacement,
    PlacementError,
    balanced_placement,
    contiguous_placement,
    load_imbalance,
)
from pruning.calibration import Calibration


def calibration_load(config: ModelConfig, calibration: Calibration) -> np.ndarray:
    """[layers, E] routed tokens per expert on the calibration text (zero rows for dense layers)."""
    counts = np.zeros((config.num_layers, config.num_experts))
    for layer in calibration.layers:
        counts[layer.layer] = layer.routed_tokens
    return counts


def served_load(config: ModelConfig, path: Path) -> np.ndarray:
    """[layers, E] routed tokens per expert since the server started, from a saved GET /v1/experts/load answer;
    PlacementError naming the file and field if it is not one for this model."""
    try:
        answer = json.loads(path.read_text())
        layers = answer["since_start"]["layers"]
        counts = np.zeros((config.num_layers, config.num_experts))
        for row in layers:
            counts[row["layer"]] = row["routed_tokens"]
    except (OSError, json.JSONDecodeError) as exc:
        raise PlacementError(f"{path}: not a readable JSON file ({exc})") from exc
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise PlacementError(
            f"{path}: expected GET /v1/experts/load's answer for a model of {config.num_layers} layers and "
            f"{config.num_experts} experts (since_start.layers[].layer, .routed_tokens); {exc!r}"
        ) from exc
    return counts


def place(config: ModelConfig, counts: np.ndarray, num_ranks: int) -> tuple[ExpertPlacement, float, float]:
    """The balanced placement for these counts, with its max/mean rank load and that of contiguous blocks."""
    rows = counts.tolist()
    balanced = balanced_placement(rows, num_ranks, config.moe_layers)
    contiguous = contiguous_placement(config.moe_layers, config.num_experts, num_ranks)
    return balanced, load_imbalance(balanced, rows), load_imbalance(contiguous, rows)
