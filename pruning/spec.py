"""What a calibration and a pruning plan are made from, as values: frozen, checked when made, and for a plan
the key of its file in the cache. Torch-free, so command lines can check a plan's settings before loading a model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pruning.choices import BUDGETS, HANDLINGS
from pruning.methods import METHODS


class PlanError(ValueError):
    """A plan that cannot be read or does not fit the model; the message names the file and field."""


@dataclass(frozen=True)
class CalibrationSpec:
    """What to calibrate on: a corpus split or the user's files, a token budget in windows of seq_len, and how
    many tokens per layer get every expert applied."""

    split: str = "validation"
    files: tuple[Path, ...] = field(default_factory=tuple)
    max_tokens: int = 262144
    seq_len: int = 512
    sample_tokens: int = 16384


def cache_key(*parts: object) -> str:
    """A short digest of the parts' JSON: the name of a cached file made from them."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class PlanSpec:
    """One pruning plan's settings: the method, the level, the budget that spreads it over layers, where removed
    experts' tokens go, the random method's seed, and the calibration it is chosen on."""

    method: str
    level: float
    budget: str = "uniform"
    handling: str = "repick"
    seed: int = 0
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown pruning method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.budget not in BUDGETS or self.handling not in HANDLINGS:
            raise ValueError(f"budget must be one of {BUDGETS} and handling one of {HANDLINGS}")
        budgets = METHODS[self.method].budgets
        if self.budget not in budgets:
            able = [name for name, method in METHODS.items() if self.budget in method.budgets]
            raise ValueError(
                f"the {self.budget} budget needs the {' or '.join(able)} method's costs; "
                f"{self.method!r} prunes by the {' or '.join(budgets)} budget only"
            )
        if not 0.0 <= self.level < 1.0:
            raise ValueError(f"pruning level must be in [0, 1), got {self.level}")

    def key(self, model_sha256: str) -> str:
        """The cache key of this plan for the model with these weights (pruning.plan.weights_sha256): the same
        string as earlier releases computed, so plans cached then are still found."""
        return cache_key(
            model_sha256, self.method, self.level, self.budget, self.handling, self.seed, asdict(self.calibration)
        )
