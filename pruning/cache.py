"""Calibrations and plans cached on disk, keyed by the model's weights and the calibration data, so a server
restarted at the same pruning level starts without recalibrating."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from engine.model import MoEForCausalLM
from pruning.calibration import Calibration, calibrate
from pruning.data import file_windows, split_windows, windows_digest
from pruning.plan import PruningPlan, make_plan, weights_sha256
from pruning.spec import CalibrationSpec, PlanSpec, cache_key

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(os.environ.get("MOE_SERVE_CACHE", Path.home() / ".cache" / "moe-serve"))


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
        / f"{cache_key(weights_sha256(model_dir), windows_digest(windows), spec.sample_tokens)}.npz"
    )
    if file.is_file():
        logger.info("calibration of %s read from %s", model_dir, file)
        return Calibration.load(file)
    calibration = calibrate(model, windows[:, :-1], sample_tokens=spec.sample_tokens, progress=progress)
    file.parent.mkdir(parents=True, exist_ok=True)
    calibration.save(file)
    return calibration


def plan_file(model_dir: Path, spec: PlanSpec, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Where cached_plan keeps the plan `spec` asks for, for the model in model_dir (named by spec's cache key)."""
    return cache_dir / "plans" / f"{spec.key(weights_sha256(model_dir))}.json"


def cached_plan(
    model_dir: Path,
    model: MoEForCausalLM,
    spec: PlanSpec,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    progress: bool = True,
) -> PruningPlan:
    """The plan `spec` asks for: read from the cache, or made (calibrating as needed) and written there."""
    file = plan_file(model_dir, spec, cache_dir)
    if file.is_file():
        logger.info("pruning plan read from %s", file)
        return PruningPlan.load(file)
    calibration = cached_calibration(model_dir, model, spec.calibration, cache_dir, progress)
    plan = make_plan(model_dir, model, calibration, spec)
    file.parent.mkdir(parents=True, exist_ok=True)
    plan.save(file)
    return plan
