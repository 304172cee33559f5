"""moe-serve started with pruning: it serves what the offline engine serves under the same plan, frees the
removed experts' weights, reports the settings in /metrics, and refuses impossible settings before binding."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import LLM, SamplingParams
from pruning.plan import PruningPlan
from server.launch import free_port, launched

SERVE_ARGS = ["--threads", "1", "--max-num-seqs", "8", "--dtype", "float32"]


def samples(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def test_pruning_level_at_startup_serves_the_plan_and_reports_it(tiny_model: Path, tmp_path: Path) -> None:
    env = {**os.environ, "MOE_SERVE_CACHE": str(tmp_path / "cache")}
    args = [*SERVE_ARGS, "--model", str(tiny_model), "--prune-level", "0.25", "--prune-method", "frequency"]
    body = {"prompt": "The experts that remain", "max_tokens": 16, "temperature": 0, "ignore_eos": True, "logprobs": 1}
    with launched(args, env=env) as server:
        served = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
        metrics = samples(server.url)
    (plan_file,) = (tmp_path / "cache" / "plans").glob("*.json")  # the plan the server made, cached
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
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 8
    (info,) = metrics["moe_serve_model_info"]
    assert info[0]["route_threshold"] == "0.3" and info[0]["top_k_override"] == "1"
    usage = response.json()["usage"]
    computed = usage["prompt_tokens"] + usage["completion_tokens"] - 1  # the last token is never fed back
    per_layer = [v for _, v in metrics["moe_serve_layer_routed_tokens_total"]]
    # top_k 1 instead of the model's 2, and the threshold drops some of those slots too.
    assert per_layer and all(0 < routed <= computed for routed in per_layer)
    assert sum(per_layer) < computed * len(per_layer)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prune-level", "0.9"], "leaving fewer than top_k"),
        (["--prune-plan", "/nonexistent/plan.json"], "plan file does not exist"),
        (["--prune-level", "0.25", "--prune-plan", "x.json"], "not both"),
        (["--route-threshold", "1.5"], "threshold must be in [0, 1)"),
    ],
)
def test_impossible_pruning_exits_before_binding(tiny_model: Path, flags: list[str], message: str) -> None:
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "--model", str(tiny_model), "--port", str(port), *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1 and message in done.stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health")
