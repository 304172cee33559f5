"""Calibrations and plans cached on disk, keyed by the model's weights and the calibration data, so a server
restarted at the same pruning level starts without recalibrating."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.model import MoEForCausalLM
from pruning.calibration import Calibration, calibrate
from pruning.data import file_windows, split_windows, windows_digest
from pruning.plan import PruningPlan, make_plan, weights_sha256

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(os.environ.get("MOE_SERVE_CACHE", Path.home() / ".cache" / "moe-serve"))


@dataclass(frozen=True)
class CalibrationSpec:
    """What to calibrate on: a corpus split or the user's files, a token budget in windows of seq_len, and how
    many tokens per layer get every expert applied."""

    split: str = "validation"
    files: tuple[Path, ...] = field(default_factory=tuple)
    max_tokens: int = 262144
    seq_len: int = 512
    sample_tokens: int = 16384


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
    key = _key(weights_sha256(model_dir), method, level, budget, handling, seed, asdict(spec))
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
