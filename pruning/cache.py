"""Calibrations and plans cached on disk, keyed by the model's weights and the calibration data, so a server
restarted at the same pruning level starts without recalibrating."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engine.model import MoEForCausalLM
from pruning.calibration import Calibration, calibrate
from pruning.choices import CALIBRATION_RANDOM_SHARE
from pruning.data import file_windows, split_windows, windows_digest
from pruning.plan import PruningPlan, make_plan, weights_sha256

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(os.environ.get("MOE_SERVE_CACHE", Path.home() / ".cache" / "moe-serve"))


@dataclass(frozen=True)
class CalibrationSpec:
    """What to calibrate on: a corpus split or the user's files, a token budget in windows of seq_len, how many
    tokens per layer get every expert applied, and the share of extra windows of uniformly random token ids
    (inputs the text lacks: they keep pes from fitting its calibration text alone; docs/pruning.md)."""

    split: str = "validation"
    files: tuple[Path, ...] = field(default_factory=tuple)
    max_tokens: int = 262144
    seq_len: int = 512
    sample_tokens: int = 16384
    random_share: float = CALIBRATION_RANDOM_SHARE

    def __post_init__(self) -> None:
        if not 0.0 <= self.random_share < 1.0:
            raise ValueError(f"the calibration's random share must be in [0, 1), got {self.random_share}")

    def key(self) -> dict[str, object]:
        """The spec as a cache key (random_share only when used, so older keys stay valid)."""
        return {k: v for k, v in asdict(self).items() if k != "random_share" or v}

    def with_random_windows(self, windows: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """windows plus random_share of random-token windows of the same length (seeded: the same every time)."""
        if not self.random_share:
            return windows
        count = round(len(windows) * self.random_share / (1.0 - self.random_share))
        generator = torch.Generator().manual_seed(0)
        return torch.cat([windows, torch.randint(0, vocab_size, (count, windows.shape[1]), generator=generator)])


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_calibration(
    model_dir: Path,
    model: MoEForCausalLM,
    spec: CalibrationSpec,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    progress: bool = True,
) -> Calibration:
    """The model's calibration on spec's data: read from the cache, or measured and written there."""
    seq_len = min(spec.seq_len, model.config.max_position_embeddings)
    if spec.files:
        windows = file_windows(model_dir, list(spec.files), seq_len, spec.max_tokens)
    else:
        windows = split_windows(model_dir, spec.split, seq_len, spec.max_tokens)
    windows = spec.with_random_windows(windows, model.config.vocab_size)
    file = (
        cache_dir
        / "calibration"
        / f"{_key(weights_sha256(model_dir), windows_digest(windows), spec.sample_tokens)}.npz"
    )
    if file.is_file():
        logger.info("calibration of %s read from %s", model_dir, file)
        return Calibration.load(file)
    calibration = calibrate(model, windows[:, :-1], sample_tokens=spec.sample_tokens, progress=progress)
    file.parent.mkdir(parents=True, exist_ok=True)
    calibration.save(file)
    return calibration


def plan_file(
    model_dir: Path,
    method: str,
    level: float,
    budget: str = "uniform",
    handling: str = "repick",
    seed: int = 0,
    spec: CalibrationSpec = CalibrationSpec(),
    cache_dir: Path = DEFAULT_CACHE_DIR,
) -> Path:
    """Where cached_plan keeps the plan for these settings (its name is the cache key)."""
    key = _key(weights_sha256(model_dir), method, level, budget, handling, seed, spec.key())
    return cache_dir / "plans" / f"{key}.json"


def cached_plan(
    model_dir: Path,
    model: MoEForCausalLM,
    method: str,
    level: float,
    budget: str = "uniform",
    handling: str = "repick",
    seed: int = 0,
    spec: CalibrationSpec = CalibrationSpec(),
    cache_dir: Path = DEFAULT_CACHE_DIR,
    progress: bool = True,
) -> PruningPlan:
    """The plan for these settings: read from the cache, or made (calibrating as needed) and written there."""
    file = plan_file(model_dir, method, level, budget, handling, seed, spec, cache_dir)
    if file.is_file():
        logger.info("pruning plan read from %s", file)
        return PruningPlan.load(file)
    calibration = cached_calibration(model_dir, model, spec, cache_dir, progress)
    plan = make_plan(model_dir, model, calibration, method, level, budget, handling, seed)
    file.parent.mkdir(parents=True, exist_ok=True)
    plan.save(file)
    return plan
