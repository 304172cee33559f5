"""Expert load as the server reports it: routed-token counts per (layer, expert), with balance figures.

The monitor is an engine observer. The engine process copies its device-side counters to the host
asynchronously every few steps (no host sync per step) and reads them directly when it goes idle; each copy
arrives with the step's stats and is published here, with a short history for the windowed figures.
Published counts keep the model's original expert ids. With them comes, per layer, how many forwards read how
many of its experts (the step's union, which batch-aware substitution shrinks).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from engine.engine_stats import EngineStats
from engine.outputs import RequestOutput


@dataclass(frozen=True)
class LayerBalance:
    """How evenly one layer's routed tokens spread over its experts."""

    max_over_mean: float  # 1.0 is perfect balance; NaN with no tokens
    coefficient_of_variation: float  # std / mean of per-expert counts; NaN with no tokens
    idle_experts: float  # experts that received no tokens; NaN with no tokens at all (idleness is undefined)


def layer_balance(counts: np.ndarray) -> list[LayerBalance]:
    """Balance figures of each row of a [layers, experts] count matrix."""
    result = []
    for row in counts.astype(np.float64):
        mean = row.mean()
        if mean == 0:
            result.append(LayerBalance(float("nan"), float("nan"), float("nan")))
            continue
        result.append(LayerBalance(float(row.max() / mean), float(row.std() / mean), float((row == 0).sum())))
    return result


class ExpertLoadMonitor:
    """Engine observer that keeps recent snapshots of the expert counters (thread-safe to read)."""

    def __init__(self, num_layers: int, num_experts: int, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self.num_experts = num_experts
        # Each snapshot: routed tokens per expert, then forwards by experts read (0..num_experts), then the tokens
        # the layer routed, per layer.
        zeros = np.zeros((num_layers, 2 * num_experts + 2), dtype=np.int64)
        self._lock = threading.Lock()
        self._history: deque[tuple[float, np.ndarray]] = deque([(time.monotonic(), zeros)])
        self._baseline = zeros
        self._baseline_time = time.time()

    # ----- engine observer (reader thread) -----

    def on_step(self, stats: EngineStats, outputs: list[RequestOutput]) -> None:
        self._publish_stats(stats)

    def on_abort(self, request_id: str, num_sequences: int) -> None:
        pass

    def on_idle(self, stats: EngineStats) -> None:
        self._publish_stats(stats)

    def _publish_stats(self, stats: EngineStats) -> None:
        if stats.expert_counts is not None:
            layers = len(stats.expert_counts)
            read = stats.experts_read
            if read is None:
                read = np.zeros((layers, self.num_experts + 1), dtype=np.int64)
            tokens = stats.tokens_routed if stats.tokens_routed is not None else np.zeros(layers, dtype=np.int64)
            self._publish(np.concatenate([stats.expert_counts, read, tokens[:, None]], axis=1))

    def _publish(self, counts: np.ndarray) -> None:
        now = time.monotonic()
        with self._lock:
            self._history.append((now, counts))
            # Keep one snapshot at or before the window's start, so the window's delta covers all of it.
            while len(self._history) > 2 and self._history[1][0] <= now - self.window_s:
                self._history.popleft()

    # ----- any thread -----

    def totals(self) -> np.ndarray:
        """Routed tokens per [layer, expert] since the server started (as of the latest read)."""
        with self._lock:
            return self._history[-1][1][:, : self.num_experts]

    def experts_read(self) -> np.ndarray:
        """Forwards per [layer, experts read] since the server started: column u counts those reading u."""
        with self._lock:
            return self._history[-1][1][:, self.num_experts : -1]

    def tokens(self) -> np.ndarray:
        """Tokens each [layer] routed since the server started."""
        with self._lock:
            return self._history[-1][1][:, -1]

    def recent(self) -> tuple[np.ndarray, float]:
        """Counts routed within about the last window_s seconds, and the seconds that window spans."""
        with self._lock:
            (start, first), (end, last) = self._history[0], self._history[-1]
        return (last - first)[:, : self.num_experts], end - start

    def since_reset(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """Routed tokens per [layer, expert], forwards per [layer, experts read] and tokens per [layer] since the
        last reset (or start), and the wall-clock time of that reset."""
        with self._lock:
            delta = self._history[-1][1] - self._baseline
            experts = self.num_experts
            return delta[:, :experts], delta[:, experts:-1], delta[:, -1], self._baseline_time

    def reset(self) -> None:
        """Start a new since-reset period; the since-start totals (Prometheus counters) are untouched."""
        with self._lock:
            self._baseline = self._history[-1][1]
            self._baseline_time = time.time()
