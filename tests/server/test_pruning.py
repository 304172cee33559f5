"""moe-serve started with pruning: it serves what the offline engine serves under the same plan, frees the
removed experts' weights, reports the settings in /metrics, and refuses impossible settings before binding."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from engine import LLM, SamplingParams, TokenRouting
from pruning.plan import PruningPlan
from pruning.serving import resolve
from pruning.settings import PruningSettings
from server.launch import launched

pytestmark = pytest.mark.slow  # servers that calibrate at start

SERVE_ARGS = ["--threads", "1", "--max-num-seqs", "8", "--dtype", "float32"]


def samples(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def test_pruning_level_at_startup_serves_the_plan_and_reports_it(
    tiny_model: Path, own_cache: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "MOE_SERVE_CACHE": str(own_cache)}
    args = [*SERVE_ARGS, "--model", str(tiny_model), "--prune-level", "0.25", "--prune-method", "frequency",
            "--calibration-tokens", "8192"]  # fmt: skip
    body = {"prompt": "The experts that remain", "max_tokens": 16, "temperature": 0, "ignore_eos": True, "logprobs": 1}
    with open(tmp_path / "server.log", "w") as log, launched(args, env=env, stderr=log) as server:
        served = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
        metrics = samples(server.url)
    (plan_file,) = (own_cache / "plans").glob("*.json")  # the plan the server made, cached
    logged = (tmp_path / "server.log").read_text()  # the plan's file, cache key and removed experts, at start
    assert f"pruning plan frequency at 0.25 (uniform, repick) from {plan_file} (cache key {plan_file.stem})" in logged
    plan = PruningPlan.load(plan_file)
    assert plan.method == "frequency" and plan.level == 0.25
    offline = LLM(tiny_model, dtype="float32", routing_policies=plan.routing_policies())
    want = offline.generate([body["prompt"]], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    assert served["text"] == want.outputs[0].text
    (info,) = metrics["moe_serve_model_info"]
    assert info[0]["prune_method"] == "frequency" and info[0]["prune_level"] == "0.25"
    assert info[0]["prune_handling"] == "repick" and info[0]["route_threshold"] == "0"
    (released,) = metrics["moe_serve_released_expert_weight_bytes"]
    (resident,) = metrics["moe_serve_model_weight_bytes"]
    assert released[1] == offline.engine.released_expert_bytes > 0
    assert resident[1] == offline.engine.weight_bytes
    routed = {(s["layer"], s["expert"]): v for s, v in metrics["moe_serve_expert_routed_tokens_total"]}
    for layer, kept in plan.kept.items():
        removed = set(range(plan.num_experts)) - set(kept)
        assert all(routed[(str(layer), str(e))] == 0 for e in removed)  # original expert ids, removed ones idle
        assert sum(routed[(str(layer), str(e))] for e in kept) > 0


def test_threshold_and_top_k_at_startup(tiny_model: Path) -> None:
    args = [*SERVE_ARGS, "--model", str(tiny_model), "--route-threshold", "0.3", "--top-k", "1"]
    body = {"prompt": "Fewer experts per token", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    with launched(args) as server:
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        metrics = samples(server.url)
        load = httpx.get(f"{server.url}/v1/experts/load").json()
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 8
    assert load["experts_per_token"] == 1 and load["top_k"] == 2
    used = [layer["experts_per_token"] for layer in load["since_start"]["layers"]]
    assert all(0 < value < 1 for value in used)  # one expert per token at most, and the threshold drops some
    (info,) = metrics["moe_serve_model_info"]
    assert info[0]["route_threshold"] == "0.3" and info[0]["top_k_override"] == "1"
    usage = response.json()["usage"]
    computed = usage["prompt_tokens"] + usage["completion_tokens"] - 1  # the last token is never fed back
    per_layer = [v for _, v in metrics["moe_serve_layer_routed_tokens_total"]]
    # top_k 1 instead of the model's 2, and the threshold drops some of those slots too.
    assert per_layer and all(0 < routed <= computed for routed in per_layer)
    assert sum(per_layer) < computed * len(per_layer)


def test_substitution_and_request_budgets_serve_what_the_engine_serves(tiny_model: Path, own_cache: Path) -> None:
    """The server's default substitution, a request turning it off, a request's own budget on top of it: each
    gives the offline engine's tokens under the same routing; the step's expert union shows in /metrics."""
    env = {**os.environ, "MOE_SERVE_CACHE": str(own_cache)}
    flags = ["--substitution-keep-top", "1", "--substitution-min-similarity", "-1"]
    body = {"prompt": "Stand-in experts", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    budgets = [None, {"substitution": None}, {"experts_per_token": 1}]
    with launched([*SERVE_ARGS, "--model", str(tiny_model), *flags], env=env) as server:
        texts = []
        for moe in budgets:
            response = httpx.post(f"{server.url}/v1/completions", json={**body, "moe": moe}, timeout=60)
            assert response.status_code == 200, response.text
            texts.append(response.json()["choices"][0]["text"])
        bad = httpx.post(f"{server.url}/v1/completions", json={**body, "moe": {"experts_per_token": 9}})
        load = httpx.get(f"{server.url}/v1/experts/load").json()
        metrics = samples(server.url)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "moe.experts_per_token"
    settings = PruningSettings(substitution_keep_top=1, substitution_min_similarity=-1.0)
    policies, _ = resolve(settings, tiny_model, "cpu", "float32", cache_dir=own_cache)
    offline = LLM(tiny_model, dtype="float32", routing_policies=policies)
    server_default = settings.token_routing()
    for moe, text in zip(budgets, texts, strict=True):
        routing = {
            None: server_default,
            "off": TokenRouting(),
            "one": replace(server_default, experts_per_token=1),
        }[None if moe is None else ("off" if "substitution" in moe else "one")]
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, routing=routing)
        assert offline.generate([body["prompt"]], params, use_tqdm=False)[0].outputs[0].text == text
    assert texts[0] != texts[1]  # substitution changed what was generated
    touched = {(s["layer"], s["le"]): v for s, v in metrics["moe_serve_experts_touched_per_step_bucket"]}
    layers = {layer for layer, _ in touched}
    # Each decode step of one request under keep_top=1 and any similarity reads exactly one expert per layer.
    assert layers and all(touched[(layer, "1.0")] >= 11 for layer in layers)
    means = [layer["experts_read_per_step"] for layer in load["since_start"]["layers"]]
    assert all(1.0 < mean < 8 for mean in means)  # prefill steps read more


def test_request_routing_is_refused_where_the_server_cannot_or_will_not(tiny_model: Path) -> None:
    body = {"prompt": "Budgets", "max_tokens": 2}
    with launched([*SERVE_ARGS, "--model", str(tiny_model)]) as server:
        no_map = httpx.post(f"{server.url}/v1/completions", json={**body, "moe": {"substitution": {"keep_top": 1}}})
        allowed = httpx.post(f"{server.url}/v1/completions", json={**body, "moe": {"route_threshold": 0.2}})
        unknown = httpx.post(f"{server.url}/v1/completions", json={**body, "moe": {"keep_top": 1}})
    assert no_map.status_code == 400 and "--substitution-keep-top" in no_map.json()["error"]["message"]
    assert allowed.status_code == 200
    assert unknown.status_code == 400 and "keep_top" in unknown.json()["error"]["message"]
    with launched([*SERVE_ARGS, "--model", str(tiny_model), "--no-allow-request-routing"]) as server:
        refused = httpx.post(f"{server.url}/v1/completions", json={**body, "moe": {"route_threshold": 0.2}})
    assert refused.status_code == 400 and "--allow-request-routing" in refused.json()["error"]["message"]


def test_an_applied_plan_checkpoint_reports_source_expert_ids_and_its_pruning(tiny_model: Path, tmp_path: Path) -> None:
    """A checkpoint `moe-prune apply` wrote holds the kept experts renumbered; the server maps its load back to
    the source ids (removed experts read 0) and reports the plan's method and level."""
    from engine.checkpoint import load_model
    from pruning.apply import apply_plan
    from pruning.cache import cached_plan
    from pruning.spec import CalibrationSpec, PlanSpec

    model = load_model(tiny_model, torch.float32, torch.device("cpu")).eval()
    spec = CalibrationSpec(max_tokens=4096, sample_tokens=256)
    plan = cached_plan(
        tiny_model, model, PlanSpec("frequency", 0.25, calibration=spec), tmp_path / "cache", progress=False
    )
    applied = apply_plan(tiny_model, plan, tmp_path / "applied")
    body = {"prompt": "Renumbered experts", "max_tokens": 8, "ignore_eos": True}
    with launched([*SERVE_ARGS, "--model", str(applied)]) as server:
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200
        load = httpx.get(f"{server.url}/v1/experts/load").json()
        metrics = samples(server.url)
    assert load["num_experts"] == plan.num_experts
    for layer in load["since_start"]["layers"]:
        kept = plan.kept[layer["layer"]]
        assert len(layer["routed_tokens"]) == plan.num_experts and sum(layer["routed_tokens"]) > 0
        assert all(count == 0 for e, count in enumerate(layer["routed_tokens"]) if e not in kept)
    (info,) = metrics["moe_serve_model_info"]
    assert info[0]["prune_method"] == "frequency" and info[0]["prune_level"] == "0.25"
    assert info[0]["prune_plan"] == str(applied / "pruning_plan.json")
    routed = {(s["layer"], s["expert"]) for s, _ in metrics["moe_serve_expert_routed_tokens_total"]}
    assert len(routed) == len(plan.kept) * plan.num_experts  # a series per source expert
