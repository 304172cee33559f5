"""/metrics and /v1/experts/load after known traffic: parsed with prometheus-client's own parser, token
counters equal the usage the API returned, expert counts add up to tokens x top_k x MoE layers."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.config import ModelConfig
from engine.engine_stats import EngineStats
from engine.expert_placement import contiguous_placement, load_imbalance, load_placement
from engine.llm_engine import EngineConfig, LLMEngine
from pruning.cli import main as moe_prune
from pruning.placement import served_load
from server.engine_process import _EngineLoop
from server.expert_load import ExpertLoadMonitor, layer_balance
from server.metrics import ServerMetrics, rank_owners
from tests.server.conftest import LiveServer

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(http: httpx.Client) -> Samples:
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def test_counters_move_exactly_with_known_traffic(live_server: LiveServer) -> None:
    config = live_server.engine.model_config
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_layers))
    with live_server.client() as http:
        before = scrape(http)
        usages = []
        for i, prompt in enumerate(["Thou art", "And Moses went up", "Mr. Darcy"]):
            body = {"prompt": prompt, "max_tokens": 5 + i, "temperature": 0, "ignore_eos": True}
            usages.append(http.post("/v1/completions", json=body).json()["usage"])
        stream = {**body, "stream": True, "stream_options": {"include_usage": True}, "prompt": "O Romeo"}
        lines = [line for line in http.post("/v1/completions", json=stream).text.splitlines() if "usage" in line]
        usages.append(httpx.Response(200, content=lines[-1][6:]).json()["usage"])
        chat = {"messages": [{"role": "user", "content": "Speak"}], "max_tokens": 4, "ignore_eos": True}
        usages.append(http.post("/v1/chat/completions", json=chat).json()["usage"])
        after = scrape(http)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    prompt_tokens = sum(u["prompt_tokens"] for u in usages)
    completion_tokens = sum(u["completion_tokens"] for u in usages)
    assert delta("moe_serve_prompt_tokens_total") == prompt_tokens
    assert delta("moe_serve_generation_tokens_total") == completion_tokens
    assert delta("moe_serve_request_success_total", finished_reason="length") == len(usages)
    assert delta("moe_serve_time_to_first_token_seconds_count") == len(usages)
    assert delta("moe_serve_e2e_request_latency_seconds_count") == len(usages)
    assert delta("moe_serve_inter_token_latency_seconds_count") == completion_tokens - len(usages)
    assert delta("moe_serve_http_requests_total", route="/v1/completions", status_code="200") == 4
    # Every computed token is routed to top_k experts in every MoE layer; the last sampled token is never computed.
    routed = (prompt_tokens + completion_tokens - len(usages)) * config.top_k * moe_layers
    assert delta("moe_serve_expert_routed_tokens_total") == routed
    assert delta("moe_serve_layer_routed_tokens_total") == routed
    name = ("model_name", "tiny-simbal")
    assert after[("moe_serve_num_requests_running", (name,))] == 0
    assert after[("moe_serve_num_requests_waiting", (name,))] == 0
    assert after[("moe_serve_kv_cache_usage_ratio", (name,))] == 0
    info = next(dict(ls) for (n, ls) in after if n == "moe_serve_model_info")
    assert info["balancing_method"] == "simbal" and info["num_experts"] == "32" and info["top_k"] == "4"
    assert after[("moe_serve_generation_tokens_per_second", (name,))] > 0
    # The engine process's peak RSS holds at least the weights it serves (the gauge is not the HTTP process's).
    assert after[("moe_serve_engine_peak_memory_bytes", (name,))] > after[("moe_serve_model_weight_bytes", (name,))]


def test_prefix_cache_counters_count_looked_up_and_reused_prompt_tokens(live_server: LiveServer) -> None:
    prompt = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0}
    with live_server.client() as http:
        before = scrape(http)
        usages = [http.post("/v1/completions", json=body).json()["usage"] for _ in range(2)]
        after = scrape(http)

    def delta(name: str) -> float:
        return total(after, name) - total(before, name)

    block = EngineConfig().block_size  # the test server runs with the default
    hits = delta("moe_serve_prefix_cache_hits_total")
    assert delta("moe_serve_prefix_cache_queries_total") == sum(u["prompt_tokens"] for u in usages)
    # The second request reuses every full block of the first's prompt but the one holding its last token.
    assert hits == (usages[0]["prompt_tokens"] - 1) // block * block > 0


def test_metric_names_follow_prometheus_rules_and_carry_the_model(live_server: LiveServer) -> None:
    with live_server.client() as http:
        http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        text = http.get("/metrics").text
    families = list(text_string_to_metric_families(text))
    assert len(families) >= 25
    for family in families:
        assert re.fullmatch(r"moe_serve_[a-z0-9_]+", family.name), family.name
        for sample in family.samples:
            assert sample.labels.get("model_name") == "tiny-simbal", sample
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples)
    names = {f.name for f in families}
    assert {
        "moe_serve_num_requests_running", "moe_serve_num_requests_waiting", "moe_serve_kv_cache_usage_ratio",
        "moe_serve_prompt_tokens", "moe_serve_generation_tokens", "moe_serve_request_success",
        "moe_serve_num_preemptions", "moe_serve_time_to_first_token_seconds", "moe_serve_inter_token_latency_seconds",
        "moe_serve_e2e_request_latency_seconds", "moe_serve_request_queue_time_seconds", "moe_serve_iteration_tokens",
        "moe_serve_expert_routed_tokens", "moe_serve_expert_load_max_over_mean_ratio", "moe_serve_idle_experts",
        "moe_serve_expert_load_coefficient_of_variation", "moe_serve_model_info",
    } <= names  # fmt: skip


def test_expert_load_endpoint_agrees_with_metrics_and_resets(live_server: LiveServer) -> None:
    with live_server.client() as http:
        http.post("/v1/completions", json={"prompt": "Hark", "max_tokens": 6, "ignore_eos": True})
        load = http.get("/v1/experts/load").json()
        samples = scrape(http)
        assert load["balancing_method"] == "simbal" and load["top_k"] == load["experts_per_token"] == 4
        assert load["pruning"] == {"prune_method": "", "prune_level": "0", "prune_plan": ""}
        assert load["since_start"]["total_routed"] == load["since_start"]["total_routed_slots"]  # the old name
        assert all(layer["experts_per_token"] == 4.0 for layer in load["since_start"]["layers"])  # none dropped
        used = [value for (metric, _), value in samples.items() if metric == "moe_serve_experts_per_token"]
        assert used and set(used) == {4.0}
        for layer in load["since_start"]["layers"]:
            for expert, count in enumerate(layer["routed_tokens"]):
                labels = {"layer": str(layer["layer"]), "expert": str(expert)}
                assert total(samples, "moe_serve_expert_routed_tokens_total", **labels) == count
            counts = np.array(layer["routed_tokens"])
            assert layer["max_over_mean"] == counts.max() / counts.mean()
            assert layer["idle_experts"] == int((counts == 0).sum())
        reset = http.post("/v1/experts/load/reset").json()
        assert reset["since_reset"]["total_routed_slots"] == 0
        assert reset["since_start"]["total_routed_slots"] == load["since_start"]["total_routed_slots"]
        assert all(layer["max_over_mean"] is None for layer in reset["since_reset"]["layers"])
        usage = http.post("/v1/completions", json={"prompt": "Hark", "max_tokens": 3, "ignore_eos": True}).json()[
            "usage"
        ]
        later = http.get("/v1/experts/load").json()
        assert later["since_reset"]["total_routed_slots"] == (usage["total_tokens"] - 1) * 4 * 4  # top-4, 4 MoE layers


def test_per_layer_mode_drops_per_expert_series(server_factory: Callable[..., Any]) -> None:
    with server_factory(per_expert_series=False) as live, live.client() as http:
        http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        samples = scrape(http)
    assert not any(name == "moe_serve_expert_routed_tokens_total" for name, _ in samples)
    assert total(samples, "moe_serve_layer_routed_tokens_total") > 0
    assert total(samples, "moe_serve_idle_experts") >= 0


def test_engine_reads_expert_counts_every_few_steps_and_the_monitor_windows_them(tiny_model: Any) -> None:
    engine = LLMEngine(tiny_model)
    loop = _EngineLoop(None, engine, read_every_steps=4)  # type: ignore[arg-type]  # no pipe needed here
    num_experts = engine.model.config.num_experts
    engine.model.expert_load.counts[0, 1] = 7
    engine.model.expert_load.counts[0, num_experts + 1 + 3] = 5  # five forwards that read three experts
    engine.model.expert_load.counts[0, -1] = 2  # two tokens
    reads = [loop._expert_counts() for _ in range(5)]
    assert all(r is None for r in reads[:4])  # the copy starts at the fourth step ...
    landed = reads[4]
    assert landed is not None  # ... and lands by the next
    counts, read, tokens = landed
    assert counts.shape == (engine.model.config.num_layers, num_experts) and counts[0, 1] == 7 and read[0, 3] == 5
    assert read.shape[1] == num_experts + 1 and tokens[0] == 2
    config = engine.model.config
    monitor = ExpertLoadMonitor(config.num_layers, config.num_experts)
    monitor.on_step(EngineStats(1, 1, 0, 1, 0.1, 0), [])
    assert monitor.totals().sum() == 0
    monitor.on_step(EngineStats(1, 1, 0, 1, 0.1, 0, expert_counts=counts, experts_read=read, tokens_routed=tokens), [])
    assert monitor.totals()[0, 1] == 7 and monitor.experts_read()[0, 3] == 5 and monitor.tokens()[0] == 2
    recent, span = monitor.recent()
    assert recent[0, 1] == 7 and span >= 0


def test_layer_balance_figures() -> None:
    skewed, even, empty = layer_balance(np.array([[4, 0, 0, 0], [2, 2, 2, 2], [0, 0, 0, 0]]))
    assert (skewed.max_over_mean, skewed.idle_experts) == (4.0, 3.0)
    assert skewed.coefficient_of_variation == np.std([4, 0, 0, 0]) / 1.0
    assert (even.max_over_mean, even.coefficient_of_variation, even.idle_experts) == (1.0, 0.0, 0.0)
    assert all(math.isnan(v) for v in (empty.max_over_mean, empty.coefficient_of_variation, empty.idle_experts))


def test_rank_series_sum_each_ranks_experts_and_show_the_busiest_rank(tiny_model: Any) -> None:
    config = ModelConfig.from_dir(tiny_model)
    layers, experts = config.moe_layers, config.num_experts
    placement = contiguous_placement(layers, experts, 2)
    monitor = ExpertLoadMonitor(config.num_layers, experts)
    metrics = ServerMetrics("m", config, 64, monitor, rank_owners=rank_owners(config, placement))
    load = np.zeros((config.num_layers, experts), dtype=np.int64)
    load[layers[0], 0] = 30  # rank 0's first expert
    load[layers[0], experts - 1] = 10  # rank 1's last
    read, tokens = np.zeros((config.num_layers, experts + 1), dtype=np.int64), np.ones(config.num_layers)
    monitor.on_step(EngineStats(1, expert_counts=load, experts_read=read, tokens_routed=tokens), [])
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }
    routed = {r: samples[("moe_serve_rank_routed_tokens_total", (("model_name", "m"), ("rank", r)))] for r in "01"}
    assert routed == {"0": 30, "1": 10}
    ratio = samples[("moe_serve_rank_load_max_over_mean_ratio", (("layer", str(layers[0])), ("model_name", "m")))]
    assert ratio == pytest.approx(30 / 20)
    one_rank = ServerMetrics("m", config, 64, monitor, rank_owners=rank_owners(config, None))
    assert 'moe_serve_rank_routed_tokens_total{model_name="m",rank="0"} 40.0' in one_rank.render().decode()


def test_a_saved_expert_load_answer_places_experts_on_ranks(
    live_server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with live_server.client() as http:
        http.post("/v1/completions", json={"prompt": "Place me", "max_tokens": 8, "ignore_eos": True})
        (tmp_path / "load.json").write_text(http.get("/v1/experts/load").text)
    model = live_server.settings.model_path
    moe_prune(["place", str(model), "--ranks", "4", "--load", str(tmp_path / "load.json"), "-o", str(tmp_path / "p")])
    placement, config = load_placement(tmp_path / "p"), ModelConfig.from_dir(model)
    counts = served_load(config, tmp_path / "load.json")
    assert placement.num_ranks == 4 and counts.sum() > 0
    contiguous = contiguous_placement(config.moe_layers, config.num_experts, 4)
    balanced, blocks = load_imbalance(placement, counts.tolist()), load_imbalance(contiguous, counts.tolist())
    assert f"busiest rank / mean load {balanced:.3f} (contiguous blocks: {blocks:.3f})" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text('{"since_start": {}}')
    with pytest.raises(SystemExit):
        moe_prune(
            ["place", str(model), "--ranks", "4", "--load", str(tmp_path / "bad.json"), "-o", str(tmp_path / "q")]
        )
    assert "bad.json: expected GET /v1/experts/load's answer" in capsys.readouterr().err
