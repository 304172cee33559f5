"""What a load-test sweep varies and how it runs a server: the serving settings, the server options, the plans
made before any server starts, and a result row per run (shared by the restart-per-setting sweep and the live
one)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from engine.checkpoint import load_model
from engine.device import resolve_device, resolve_dtype
from loadtests.locust_run import LoadResult, Workload
from pruning.cache import cached_plan
from pruning.methods import METHODS
from pruning.spec import CalibrationSpec, PlanSpec

MIB = 2**20


@dataclass(frozen=True)
class Setting:
    """One serving configuration: unpruned ("none"), a pruning method at a level, a routing threshold, or
    batch-aware substitution (keep_top slots kept, the others re-routed to experts at least min_similarity
    alike)."""

    method: str
    level: float = 0.0
    route_threshold: float = 0.0
    keep_top: int | None = None
    min_similarity: float = 0.5

    @property
    def name(self) -> str:
        if self.method == "threshold":
            return f"tau{self.route_threshold:g}"
        if self.method == "substitution":
            return f"sub{self.keep_top}@{self.min_similarity:g}"
        return "none" if self.method == "none" else f"{self.method}-{self.level:g}"

    def routing_body(self, plan: Path | None) -> dict[str, Any]:
        """The POST /v1/routing body that switches a server with the admin API to this setting."""
        substitution = (
            None if self.keep_top is None else {"keep_top": self.keep_top, "min_similarity": self.min_similarity}
        )
        pruning: dict[str, Any] = {"prune_plan": str(plan)} if plan is not None else {"prune_level": 0.0}
        return {"route_threshold": self.route_threshold, "substitution": substitution, **pruning}


def settings_grid(
    methods: list[str], levels: list[float], thresholds: list[float], substitutions: Sequence[tuple[int, float]] = ()
) -> list[Setting]:
    """The unpruned baseline first, then every method at every nonzero level, then every nonzero threshold, then
    every substitution (keep_top, min_similarity)."""
    for value in [*levels, *thresholds]:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"pruning levels and routing thresholds must be in [0, 1), got {value}")
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown pruning method {method!r}; expected one of {', '.join(METHODS)}")
    for keep_top, min_similarity in substitutions:
        if keep_top < 0 or not -1.0 <= min_similarity <= 1.0:
            raise ValueError(
                f"a substitution needs keep_top >= 0 and min_similarity in [-1, 1], got {keep_top}:{min_similarity}"
            )
    grid = [Setting("none")]
    grid += [Setting(method, level) for method in methods for level in levels if level > 0]
    grid += [Setting("threshold", route_threshold=tau) for tau in thresholds if tau > 0]
    grid += [Setting("substitution", keep_top=k, min_similarity=rho) for k, rho in substitutions]
    return grid


@dataclass(frozen=True)
class ServerOptions:
    """How every moe-serve of the sweep runs."""

    device: str = "auto"
    dtype: str = "auto"
    threads: int = max(1, (os.cpu_count() or 2) - 1)  # leave a core to locust
    max_num_seqs: int = 64
    ready_timeout_s: float = 600.0
    api_key: str | None = None  # given to every server and sent by every client of the sweep

    def args(self, model_dir: Path) -> list[str]:
        return [
            "--model", str(model_dir), "--device", self.device, "--dtype", self.dtype, "--threads", str(self.threads),
            "--max-num-seqs", str(self.max_num_seqs), "--max-queue", "4096", "--log-level", "warning",
            "--api-key", self.api_key or "",
        ]  # fmt: skip


def make_plans(
    model_dir: Path, settings: list[Setting], spec: CalibrationSpec, options: ServerOptions, out: Path, cache_dir: Path
) -> dict[Setting, Path]:
    """Plan files for the pruned settings, made here (calibrating once per model, with progress) or read from
    the cache, so that each server starts without calibrating."""
    pruned = [s for s in settings if s.method in METHODS]
    if not pruned:
        return {}
    device = resolve_device(options.device)
    with torch.no_grad():
        model = load_model(model_dir, resolve_dtype(options.dtype, device), device).eval()
        files = {}
        for setting in pruned:
            plan = cached_plan(model_dir, model, PlanSpec(setting.method, setting.level, calibration=spec), cache_dir)
            files[setting] = out / "plans" / f"{model_dir.resolve().name}-{setting.name}.json"
            files[setting].parent.mkdir(parents=True, exist_ok=True)
            plan.save(files[setting])
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the servers need this memory
    return files


def scrape(url: str) -> dict[str, float]:
    """The server's model-wide samples (those labelled by model_name alone), by name."""
    response = httpx.get(f"{url}/metrics", timeout=30)
    response.raise_for_status()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if set(sample.labels) <= {"model_name"}
    }


def warm_up(url: str, model: str, requests: int, api_key: str | None = None) -> None:
    """Short completions, four at a time: first-use costs of batch shapes are paid before anything is timed."""
    body = {"model": model, "prompt": "The first words of a warm-up request", "max_tokens": 8, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=120) as client, ThreadPoolExecutor(4) as pool:
        for response in pool.map(lambda _: client.post("/v1/completions", json=body), range(requests)):
            response.raise_for_status()


def result_row(
    model: str, balancing: str, setting: Setting, result: LoadResult, metrics: dict[str, float], round_: int = 0
) -> dict[str, Any]:
    """One run's row of the results table (perplexity is added when the setting has been scored)."""
    return {
        "model": model,
        "balancing": balancing,
        "setting": setting.name,
        "method": setting.method,
        "level": setting.level,
        "route_threshold": setting.route_threshold,
        "keep_top": setting.keep_top,
        "min_similarity": setting.min_similarity if setting.keep_top is not None else None,
        "round": round_,
        "users": result.users,
        "requests": result.requests,
        "failures": result.failures,
        "duration_s": result.duration_s,
        "requests_per_s": result.requests_per_s,
        "input_tokens_per_s": result.input_tokens_per_s,
        "output_tokens_per_s": result.output_tokens_per_s,
        "ttft_p50_ms": result.ttft_ms[50],
        "ttft_p99_ms": result.ttft_ms[99],
        "itl_p50_ms": result.itl_ms[50],
        "itl_p99_ms": result.itl_ms[99],
        "tpot_p50_ms": result.tpot_ms[50],
        "tpot_p99_ms": result.tpot_ms[99],
        "e2e_p50_ms": result.e2e_ms[50],
        "e2e_p99_ms": result.e2e_ms[99],
        "peak_memory_mib": _metric(metrics, "moe_serve_engine_peak_memory_bytes") / MIB,
        "weight_mib": _metric(metrics, "moe_serve_model_weight_bytes") / MIB,
    }


def _metric(metrics: dict[str, float], name: str) -> float:
    if name not in metrics:
        raise RuntimeError(f"the server's /metrics has no {name}")
    return metrics[name]


def sweep_record(
    users: list[int], rounds: int, workload: Workload, options: ServerOptions, spec: CalibrationSpec, **extra: Any
) -> dict[str, Any]:
    """What a sweep ran with (results.json's "settings"); the API key only as whether one was set."""
    server = {**asdict(options), "api_key": "set" if options.api_key else None}
    return jsonable({"users": users, "rounds": rounds, **extra, "workload": asdict(workload), "server": server,
                     "calibration": asdict(spec)})  # fmt: skip


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value
