"""A checkpoint written by `moe-prune apply` keeps only the plan's experts, numbered 0..kept-1. Its config.json
records which source experts they are (`pruning.kept_experts`), so the server reports expert load under the
source model's ids (removed experts read 0, as when the same plan is served at start-up) and its pruning
settings in the model-info metric, instead of an unpruned-looking model with renumbered experts."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from engine.config import ModelConfig
from engine.engine_stats import EngineStats
from engine.outputs import RequestOutput
from server.async_engine import EngineObserver


@dataclass(frozen=True)
class SourceExperts:
    """The source model's expert count, and per MoE layer the source id of each expert the checkpoint kept."""

    num_experts: int
    kept: dict[int, list[int]]
    method: str
    level: float
    plan_file: Path | None

    @classmethod
    def of(cls, model_dir: Path, config: ModelConfig) -> SourceExperts | None:
        """The mapping of an applied plan's checkpoint; None for any other checkpoint."""
        pruning = config.raw.get("pruning")
        if not isinstance(pruning, dict) or not isinstance(pruning.get("kept_experts"), dict):
            return None
        kept = {int(layer): [int(e) for e in ids] for layer, ids in pruning["kept_experts"].items()}
        plan_file = model_dir / "pruning_plan.json"
        count = pruning.get("source_num_experts")
        if count is None and plan_file.is_file():
            count = json.loads(plan_file.read_text()).get("num_experts")
        if count is None:
            count = 1 + max((max(ids) for ids in kept.values() if ids), default=config.num_experts - 1)
        return cls(
            int(count),
            kept,
            str(pruning.get("method", "")),
            float(pruning.get("level", 0.0)),
            plan_file if plan_file.is_file() else None,
        )

    def served_config(self, config: ModelConfig) -> ModelConfig:
        """The config as the metrics see it: the source model's expert count."""
        return replace(config, num_experts=self.num_experts)

    def labels(self) -> dict[str, str]:
        """The pruning labels of the model-info metric (PruningSettings.labels' names)."""
        return {
            "prune_method": self.method,
            "prune_level": f"{self.level:g}",
            "prune_plan": str(self.plan_file or ""),
        }

    def expand(self, stats: EngineStats) -> EngineStats:
        """stats with expert counts under source ids (zeros for removed experts) and the experts-read histogram
        widened to the source count."""
        if stats.expert_counts is None:
            return stats
        counts = np.zeros((len(stats.expert_counts), self.num_experts), dtype=np.int64)
        for layer, ids in self.kept.items():
            counts[layer, ids] = stats.expert_counts[layer, : len(ids)]
        read = stats.experts_read
        if read is not None:
            read = np.pad(read, ((0, 0), (0, self.num_experts + 1 - read.shape[1])))
        return replace(stats, expert_counts=counts, experts_read=read)


class SourceIdObserver:
    """Forwards the engine's progress to observers with expert counts under source ids."""

    def __init__(self, source: SourceExperts, observers: list[EngineObserver]) -> None:
        self.source = source
        self.observers = observers

    def on_step(self, stats: EngineStats, outputs: list[RequestOutput]) -> None:
        expanded = self.source.expand(stats)
        for observer in self.observers:
            observer.on_step(expanded, outputs)

    def on_abort(self, request_id: str, num_sequences: int) -> None:
        for observer in self.observers:
            observer.on_abort(request_id, num_sequences)

    def on_idle(self, stats: EngineStats) -> None:
        expanded = self.source.expand(stats)
        for observer in self.observers:
            observer.on_idle(expanded)
