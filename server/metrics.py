"""Prometheus metrics: vLLM's serving set under the `moe_serve_` prefix, plus expert load and balance.

Request and engine metrics are updated from each step's outputs, the engine's own timestamps (RequestMetrics,
monotonic clock, comparable across processes) and its stats, on the thread that receives them from the
engine process, so the HTTP handlers add no work per token. Expert series are rendered at scrape
time from the ExpertLoadMonitor's latest snapshot. Every series carries the model_name label.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from engine.config import ModelConfig
from engine.engine_stats import EngineStats
from engine.expert_placement import ExpertPlacement
from engine.outputs import RequestOutput
from engine.token_routing import TokenRouting
from server.expert_load import ExpertLoadMonitor, layer_balance

# The `_created` companion series double the exposition and no dashboard reads them (process-wide setting).
disable_created_metrics()
PREFIX = "moe_serve"
# vLLM's bucket choices (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
TOKEN_LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                         20.0, 40.0, 80.0]  # fmt: skip
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0]  # fmt: skip
ITERATION_TOKEN_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
THROUGHPUT_WINDOW_S = 10.0
# Per-expert series above this many (layer, expert) pairs are off unless asked for (bounded cardinality).
AUTO_PER_EXPERT_LIMIT = 4096


def token_count_buckets(max_model_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_model_len, as vLLM buckets request token counts."""
    buckets: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_model_len:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


@dataclass
class _RequestState:
    tokens: int
    last_token_time: float


ROUTING_LABELS = (
    "model_name",
    "generation",
    "route_threshold",
    "experts_per_token",
    "substitution",
    "prune_method",
    "prune_level",
    "prune_plan",
)


class ServerMetrics:
    """The server's metric registry, fed by the engine's steps (an EngineObserver) and by HTTP middleware."""

    def __init__(
        self,
        model_name: str,
        config: ModelConfig,
        max_model_len: int,
        expert_load: ExpertLoadMonitor,
        per_expert_series: bool | None = None,
        model_info: dict[str, str] | None = None,
        startup: Callable[[], tuple[float, float]] | None = None,
        expert_weight_bytes: tuple[int, ...] = (),
        rank_owners: np.ndarray | None = None,
    ) -> None:
        self.model_name = model_name
        self.expert_load = expert_load
        pairs = config.num_layers * config.num_experts
        self.per_expert_series = pairs <= AUTO_PER_EXPERT_LIMIT if per_expert_series is None else per_expert_series
        self.moe_layers = config.moe_layers
        # The engine rank holding each [layer, expert] (-1: none), for the per-rank load series; None: not known.
        self.rank_owners = rank_owners
        self.registry = registry = CollectorRegistry()
        labels = ["model_name"]

        # Metrics labelled only by model_name are kept as their labelled child: no label lookup per update.
        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"{PREFIX}_{name}", doc, labels, registry=registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=registry).labels(model_name)

        def histogram(name: str, doc: str, buckets: list[float] | list[int]) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", doc, labels, buckets=buckets, registry=registry).labels(model_name)

        # The engine's own series, from the metric table in its stats (engine/engine_stats.py).
        exported = [(f.name, spec) for f in fields(EngineStats) if (spec := f.metadata.get("metric")) is not None]
        self._engine_gauges = [(name, gauge(spec.name, spec.help)) for name, spec in exported if spec.kind == "gauge"]
        self._engine_counters = [
            (name, counter(spec.name, spec.help)) for name, spec in exported if spec.kind == "counter"
        ]
        self._totals_seen: dict[str, int] = {}
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that produced output.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.finished = Counter(
            f"{PREFIX}_request_success",
            "Finished completions by reason: stop, length or abort.",
            [*labels, "finished_reason"],
            registry=registry,
        )
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between a request's tokens.", TOKEN_LATENCY_BUCKETS)
        self.tpot = histogram(
            "request_time_per_output_token_seconds", "Decode time per output token.", TOKEN_LATENCY_BUCKETS
        )
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", REQUEST_LATENCY_BUCKETS)
        self.queue_time = histogram(
            "request_queue_time_seconds", "Arrival to first scheduled.", REQUEST_LATENCY_BUCKETS
        )
        self.prefill_time = histogram(
            "request_prefill_time_seconds", "First scheduled to first token.", REQUEST_LATENCY_BUCKETS
        )
        self.decode_time = histogram("request_decode_time_seconds", "First token to finish.", REQUEST_LATENCY_BUCKETS)
        self.iteration_tokens = histogram(
            "iteration_tokens", "Tokens run through the model per engine step.", ITERATION_TOKEN_BUCKETS
        )
        length_buckets = token_count_buckets(max_model_len)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per request.", length_buckets)
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per request.", length_buckets
        )
        self.throughput = gauge(
            "generation_tokens_per_second", f"Generated tokens per second over the last {THROUGHPUT_WINDOW_S:g} s."
        )
        self.http_requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests by route and status code.",
            [*labels, "method", "route", "status_code"],
            registry=registry,
        )
        info = Info(
            f"{PREFIX}_model", "The served model: balancing method, shape and runtime.", labels, registry=registry
        )
        info.labels(model_name).info(model_info or {})
        self.routing_info = Gauge(
            f"{PREFIX}_routing_config_info",
            "The routing budget requests without a `moe` field run under (1 for the current one), by generation.",
            ROUTING_LABELS,
            registry=registry,
        )
        self.routing_changes = counter("routing_changes", "Live switches of the routing budget (POST /v1/routing).")
        if startup is not None:
            gauge("engine_compile_seconds", "Seconds the engine spent compiling its forward at start-up.").set_function(
                lambda: startup()[0]
            )
            gauge(
                "engine_warmup_seconds", "Seconds from model loaded to ready (compilation and a warm-up request)."
            ).set_function(lambda: startup()[1])
        rank_bytes = Gauge(
            f"{PREFIX}_expert_weight_bytes",
            "Routed-expert weight bytes each engine rank holds, measured at start-up (one rank, 0, without expert "
            "parallelism; live pruning that releases experts shows in released_expert_weight_bytes).",
            [*labels, "rank"],
            registry=registry,
        )
        for rank, held in enumerate(expert_weight_bytes):
            rank_bytes.labels(model_name, str(rank)).set(held)
        registry.register(_ExpertCollector(self))

        self._requests: dict[str, _RequestState] = {}
        self._recent_tokens: deque[tuple[float, int]] = deque()
        self._recent_lock = threading.Lock()
        self.throughput.set_function(self._recent_tokens_per_second)

    # ----- engine observer (reader thread) -----

    def on_step(self, stats: EngineStats, outputs: list[RequestOutput]) -> None:
        self.iteration_tokens.observe(stats.num_step_tokens)
        new_tokens = 0
        for output in outputs:
            new_tokens += self._observe_request(output)
        if new_tokens:
            self.generation_tokens.inc(new_tokens)
            with self._recent_lock:
                self._recent_tokens.append((time.monotonic(), new_tokens))
        self._update_engine_gauges(stats)

    def _observe_request(self, output: RequestOutput) -> int:
        """Observe one request's step; return how many tokens it generated in it."""
        metrics = output.metrics
        assert metrics is not None and metrics.last_token_time is not None
        tokens = sum(len(c.token_ids) for c in output.outputs)
        state = self._requests.get(output.request_id)
        if state is None:
            state = self._requests[output.request_id] = _RequestState(0, metrics.last_token_time)
            self.prompt_tokens.inc(len(output.prompt_token_ids))
            self.ttft.observe(metrics.last_token_time - metrics.arrival_time)
            if metrics.first_scheduled_time is not None:
                self.queue_time.observe(metrics.first_scheduled_time - metrics.arrival_time)
                self.prefill_time.observe(metrics.last_token_time - metrics.first_scheduled_time)
        elif tokens > state.tokens:
            self.itl.observe(metrics.last_token_time - state.last_token_time)
        new = tokens - state.tokens
        state.tokens, state.last_token_time = tokens, metrics.last_token_time
        if output.finished:
            del self._requests[output.request_id]
            self._observe_finished(output)
        return new

    def _observe_finished(self, output: RequestOutput) -> None:
        name, metrics = self.model_name, output.metrics
        assert metrics is not None and metrics.finished_time is not None and metrics.first_token_time is not None
        decode = metrics.finished_time - metrics.first_token_time
        self.e2e.observe(metrics.finished_time - metrics.arrival_time)
        self.decode_time.observe(decode)
        self.request_prompt_tokens.observe(len(output.prompt_token_ids))
        self.request_generation_tokens.observe(sum(len(c.token_ids) for c in output.outputs))
        longest = max(len(c.token_ids) for c in output.outputs)
        if longest > 1:
            self.tpot.observe(decode / (longest - 1))
        for completion in output.outputs:
            self.finished.labels(name, completion.finish_reason or "abort").inc()

    def on_abort(self, request_id: str, num_sequences: int) -> None:
        self._requests.pop(request_id, None)
        self.finished.labels(self.model_name, "abort").inc(num_sequences)

    def on_idle(self, stats: EngineStats) -> None:
        self._update_engine_gauges(stats)

    def _update_engine_gauges(self, stats: EngineStats) -> None:
        for field_name, gauge in self._engine_gauges:
            gauge.set(getattr(stats, field_name))
        for field_name, counter in self._engine_counters:
            total, seen = getattr(stats, field_name), self._totals_seen.get(field_name, 0)
            if total > seen:
                counter.inc(total - seen)
                self._totals_seen[field_name] = total

    def _recent_tokens_per_second(self) -> float:
        cutoff = time.monotonic() - THROUGHPUT_WINDOW_S
        with self._recent_lock:
            while self._recent_tokens and self._recent_tokens[0][0] < cutoff:
                self._recent_tokens.popleft()
            return sum(n for _, n in self._recent_tokens) / THROUGHPUT_WINDOW_S

    # ----- HTTP side -----

    def routing_changed(self, routing: TokenRouting, generation: int, pruning: dict[str, str]) -> None:
        """Publish the current routing budget and pruning (PruningSettings.labels; the previous generation's
        series is removed)."""
        self.routing_info.clear()
        substitution = (
            "" if routing.keep_top is None else f"keep_top={routing.keep_top},min_similarity={routing.min_similarity:g}"
        )
        self.routing_info.labels(
            self.model_name,
            str(generation),
            f"{routing.min_prob:g}",
            str(routing.experts_per_token or ""),
            substitution,
            pruning.get("prune_method", ""),
            pruning.get("prune_level", "0"),
            pruning.get("prune_plan", ""),
        ).set(1)
        if generation:
            self.routing_changes.inc()

    def observe_http(self, method: str, route: str, status_code: int) -> None:
        self.http_requests.labels(self.model_name, method, route, str(status_code)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ExpertCollector:
    """Expert series rendered at scrape time from the monitor's latest snapshot (no engine work)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        monitor, name, layers = m.expert_load, m.model_name, m.moe_layers
        totals = monitor.totals()
        routed = CounterMetricFamily(
            f"{PREFIX}_layer_routed_tokens",
            "Routed (token, expert) pairs per MoE layer.",
            labels=["model_name", "layer"],
        )
        tokens = monitor.tokens()
        through = CounterMetricFamily(
            f"{PREFIX}_layer_tokens",
            "Tokens through each MoE layer; rate(layer_routed_tokens) / rate(layer_tokens) is experts per token.",
            labels=["model_name", "layer"],
        )
        per_token = GaugeMetricFamily(
            f"{PREFIX}_experts_per_token",
            "Mean experts a token used per MoE layer since start, after thresholds, budgets, substitution and dropped "
            "slots (NaN before the first token).",
            labels=["model_name", "layer"],
        )
        for layer in layers:
            routed.add_metric([name, str(layer)], float(totals[layer].sum()))
            through.add_metric([name, str(layer)], float(tokens[layer]))
            used = float(totals[layer].sum() / tokens[layer]) if tokens[layer] else float("nan")
            per_token.add_metric([name, str(layer)], used)
        yield from (routed, through, per_token)
        if m.per_expert_series:
            family = CounterMetricFamily(
                f"{PREFIX}_expert_routed_tokens",
                "Tokens routed to each expert (original expert ids).",
                labels=["model_name", "layer", "expert"],
            )
            for layer in layers:
                for expert, count in enumerate(totals[layer].tolist()):
                    family.add_metric([name, str(layer), str(expert)], float(count))
            yield family
        recent, span = monitor.recent()
        window = f"over the last {monitor.window_s:g} s of routing (NaN when the layer routed nothing)"
        gauges = {
            "max_over_mean": GaugeMetricFamily(
                f"{PREFIX}_expert_load_max_over_mean_ratio", f"Busiest expert's load / mean load, {window}.",
                labels=["model_name", "layer"],
            ),
            "cv": GaugeMetricFamily(
                f"{PREFIX}_expert_load_coefficient_of_variation", f"Std / mean of expert loads, {window}.",
                labels=["model_name", "layer"],
            ),
            "idle": GaugeMetricFamily(
                f"{PREFIX}_idle_experts", f"Experts that received no tokens, {window}.", labels=["model_name", "layer"]
            ),
        }  # fmt: skip
        balances = layer_balance(recent)
        for layer in layers:
            balance = balances[layer]
            gauges["max_over_mean"].add_metric([name, str(layer)], balance.max_over_mean)
            gauges["cv"].add_metric([name, str(layer)], balance.coefficient_of_variation)
            gauges["idle"].add_metric([name, str(layer)], balance.idle_experts)
        yield from gauges.values()
        if m.rank_owners is not None:
            yield from _rank_load(m.rank_owners, totals, recent, layers, name, window)
        yield _single_gauge(
            f"{PREFIX}_expert_load_window_seconds", "Span of the window the balance gauges cover.", name, span
        )
        yield _experts_touched(monitor.experts_read(), layers, name)


def rank_owners(config: ModelConfig, placement: ExpertPlacement | None) -> np.ndarray:
    """long [layers, E]: the engine rank holding each expert (-1: none, or not a MoE layer); without expert
    parallelism rank 0 holds every expert."""
    owners = np.full((config.num_layers, config.num_experts), -1, dtype=np.int64)
    for layer in config.moe_layers:
        owners[layer] = placement.owner_row(layer) if placement is not None else 0
    return owners


def _rank_load(
    owners: np.ndarray, totals: np.ndarray, recent: np.ndarray, layers: list[int], model_name: str, window: str
) -> Iterator[Metric]:
    """Routed pairs per engine rank since start, and per layer the busiest rank's share of the recent load."""
    ranks = int(owners.max()) + 1
    routed = CounterMetricFamily(
        f"{PREFIX}_rank_routed_tokens",
        "Routed (token, expert) pairs served by each engine rank's experts (expert parallelism; rank 0 holds every "
        "expert without it).",
        labels=["model_name", "rank"],
    )
    imbalance = GaugeMetricFamily(
        f"{PREFIX}_rank_load_max_over_mean_ratio",
        f"Busiest engine rank's routed load / mean rank load per MoE layer, {window}.",
        labels=["model_name", "layer"],
    )
    per_rank = np.zeros(ranks)
    for layer in layers:
        homed = owners[layer] >= 0
        per_rank += np.bincount(owners[layer][homed], weights=totals[layer][homed], minlength=ranks)
        loads = np.bincount(owners[layer][homed], weights=recent[layer][homed], minlength=ranks)
        ratio = float(loads.max() / loads.mean()) if loads.sum() else float("nan")
        imbalance.add_metric([model_name, str(layer)], ratio)
    for rank, count in enumerate(per_rank.tolist()):
        routed.add_metric([model_name, str(rank)], count)
    yield from (routed, imbalance)


def experts_touched_buckets(num_experts: int) -> list[int]:
    """Powers of two below num_experts, then num_experts: few series even at 256 experts."""
    buckets = [1]
    while buckets[-1] * 2 < num_experts:
        buckets.append(buckets[-1] * 2)
    return [*buckets, num_experts] if buckets[-1] < num_experts else buckets


def _experts_touched(read: np.ndarray, layers: list[int], model_name: str) -> HistogramMetricFamily:
    """Per layer, the distinct experts each forward step read, as a histogram built from exact counts."""
    family = HistogramMetricFamily(
        f"{PREFIX}_experts_touched_per_step",
        "Distinct experts a forward step read, per MoE layer (the union of its tokens' experts after pruning "
        "and substitution; U(B) = E(1 - (1 - k/E)^B) for B uniformly routed tokens).",
        labels=["model_name", "layer"],
    )
    experts = np.arange(read.shape[1])
    for layer in layers:
        row = read[layer]
        cumulative = [
            (floatToGoString(b), float(row[: b + 1].sum())) for b in experts_touched_buckets(read.shape[1] - 1)
        ]
        family.add_metric(
            [model_name, str(layer)], [*cumulative, ("+Inf", float(row.sum()))], float((row * experts).sum())
        )
    return family


def _single_gauge(metric: str, doc: str, model_name: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(metric, doc, labels=["model_name"])
    family.add_metric([model_name], value)
    return family
