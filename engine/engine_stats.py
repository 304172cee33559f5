"""What the engine reports about itself after each step: one frozen value that the serving side ships and
turns into Prometheus series.

A field that is a metric says so in its metadata (`gauge` or `counter`, with its name and help), so adding an
engine gauge is a field here and the line that fills it in `LLMEngine.stats`; the server's metrics read this
table and need no edit. Counters are running totals: the exporter adds the difference since its last read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np


@dataclass(frozen=True)
class MetricSpec:
    """How a stats field is exported: a gauge (its value now) or a counter (a running total), name and help."""

    kind: Literal["gauge", "counter"]
    name: str
    help: str


def gauge(name: str, help: str) -> dict[str, Any]:
    """Field metadata: export the field as a gauge."""
    return {"metric": MetricSpec("gauge", name, help)}


def counter(name: str, help: str) -> dict[str, Any]:
    """Field metadata: export the field, a running total, as a counter."""
    return {"metric": MetricSpec("counter", name, help)}


@dataclass(frozen=True)
class EngineStats:
    """The engine's state after a step (or when idle): what gauges and the expert-load monitor read."""

    num_step_tokens: int = 0  # tokens run through the model in the step (0 when idle)
    num_running: int = field(
        default=0, metadata=gauge("num_requests_running", "Sequences in the running batch (a request with n has n).")
    )
    num_waiting: int = field(default=0, metadata=gauge("num_requests_waiting", "Sequences waiting to be scheduled."))
    num_requests: int = 0  # requests the engine holds
    kv_cache_usage: float = field(
        default=0.0, metadata=gauge("kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0 to 1).")
    )
    num_preemptions: int = field(
        default=0, metadata=counter("num_preemptions", "Sequences preempted (KV blocks freed, recomputed later).")
    )
    peak_memory_bytes: int = field(
        default=0,
        metadata=gauge(
            "engine_peak_memory_bytes",
            "Peak memory of the engine process: torch's peak reservation on CUDA, peak resident set size on CPU.",
        ),
    )
    weight_bytes: int = field(
        default=0, metadata=gauge("model_weight_bytes", "Bytes of model weights resident on the device.")
    )
    released_expert_bytes: int = field(
        default=0,
        metadata=gauge(
            "released_expert_weight_bytes",
            "Bytes of expert weights freed because pruning removed them (at load, or by the live pruning now).",
        ),
    )
    prefix_cache_queries: int = field(
        default=0, metadata=counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
    )
    prefix_cache_hits: int = field(
        default=0, metadata=counter("prefix_cache_hits", "Prompt tokens served from the prefix cache (not computed).")
    )
    expert_counts: np.ndarray | None = None  # routed tokens per [layer, expert], when a read landed
    experts_read: np.ndarray | None = None  # with expert_counts: forwards per [layer, experts they read]
    tokens_routed: np.ndarray | None = None  # with expert_counts: tokens per [layer]
