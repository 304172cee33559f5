"""The admin API: off by default, behind the API key, switching the routing budget and the pruning live under a
running stream without failing it, refusing bad settings without changing anything, and counted in /metrics."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import httpx
import pytest

from engine import LLM, SamplingParams, TokenRouting
from pruning.plan import PruningPlan
from pruning.serving import resolve
from pruning.settings import PruningSettings
from server.launch import launched
from tests.server.test_pruning import SERVE_ARGS, samples

pytestmark = pytest.mark.slow  # live servers switched under streams


def stream_in_background(client: httpx.Client, body: dict[str, object]) -> tuple[threading.Thread, list[str]]:
    """Start a streamed completion on a thread; return once its first chunk arrived (the thread, and the lines
    it collects)."""
    first_chunk, streamed = threading.Event(), []

    def stream() -> None:
        with client.stream("POST", "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if line:
                    streamed.append(line)
                    first_chunk.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_chunk.wait(60)
    return reader, streamed


def test_the_admin_api_is_off_unless_enabled(tiny_model: Path) -> None:
    with launched([*SERVE_ARGS, "--model", str(tiny_model)]) as server:
        assert httpx.get(f"{server.url}/v1/routing").status_code == 404
        assert httpx.post(f"{server.url}/v1/routing", json={"route_threshold": 0.1}).status_code == 404


def test_a_live_switch_applies_from_the_next_step_and_fails_no_stream(tiny_model: Path, own_cache: Path) -> None:
    env = {**os.environ, "MOE_SERVE_CACHE": str(own_cache)}
    args = [*SERVE_ARGS, "--model", str(tiny_model), "--enable-admin-api", "--similarity-maps", "--api-key", "k"]
    auth = {"Authorization": "Bearer k"}
    body = {"prompt": "Switch while I stream", "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    long_stream = {**body, "max_tokens": 200, "stream": True}  # still streaming when the switch lands
    switch = {"substitution": {"keep_top": 1, "min_similarity": -1}}
    with launched(args, env=env) as server, httpx.Client(base_url=server.url, headers=auth, timeout=60) as client:
        assert httpx.get(f"{server.url}/v1/routing").status_code == 401
        assert client.get("/v1/routing").json() == {
            "generation": 0, "route_threshold": 0.0, "experts_per_token": None, "substitution": None,
            "prune_level": 0.0, "prune_method": None, "prune_plan": None,
        }  # fmt: skip
        reader, streamed = stream_in_background(client, long_stream)
        switched = client.post("/v1/routing", json=switch)
        reader.join(60)
        after = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        partial = client.post("/v1/completions", json={**body, "moe": {"route_threshold": 0.01}})
        bad = client.post("/v1/routing", json={"experts_per_token": 99})
        unknown = client.post("/v1/routing", json={"keep_top": 1})
        final = client.get("/v1/routing").json()
        metrics = samples(server.url)
    assert switched.status_code == 200 and switched.json()["generation"] == 1
    assert switched.json()["substitution"] == {"keep_top": 1, "min_similarity": -1.0}
    assert streamed[-1] == "data: [DONE]" and not any('"error"' in line for line in streamed)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "experts_per_token"
    assert unknown.status_code == 400
    assert final["generation"] == 1 and final["substitution"] == {"keep_top": 1, "min_similarity": -1.0}
    (info,) = metrics["moe_serve_routing_config_info"]
    assert info[0]["generation"] == "1" and info[0]["substitution"] == "keep_top=1,min_similarity=-1" and info[1] == 1
    assert metrics["moe_serve_routing_changes_total"][0][1] == 1
    # A request after the switch gets what the engine gives under the new budget.
    policies, _ = resolve(PruningSettings(similarity_maps=True), tiny_model, "cpu", "float32", own_cache)
    offline = LLM(tiny_model, dtype="float32", routing_policies=policies)
    params = SamplingParams(
        max_tokens=48, temperature=0, ignore_eos=True, routing=TokenRouting(keep_top=1, min_similarity=-1)
    )
    assert offline.generate([body["prompt"]], params, use_tqdm=False)[0].outputs[0].text == after
    # A request's partial `moe` field applies on top of the live budget, not the one the server started with.
    params.routing = TokenRouting(keep_top=1, min_similarity=-1, min_prob=0.01)
    partial_text = partial.json()["choices"][0]["text"]
    assert offline.generate([body["prompt"]], params, use_tqdm=False)[0].outputs[0].text == partial_text


def test_pruning_switches_live_under_a_stream_and_serves_the_plan(
    tiny_model: Path, own_cache: Path, tmp_path: Path
) -> None:
    """A level, a plan file and back to none, each switched while a stream runs: no stream fails, each request
    after a switch gets the offline engine's tokens under that plan, bad switches change nothing."""
    cache = own_cache
    env = {**os.environ, "MOE_SERVE_CACHE": str(cache)}
    body = {"prompt": "Prune me while I stream", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    long_stream = {**body, "max_tokens": 400, "stream": True}
    with (
        launched(
            [*SERVE_ARGS, "--model", str(tiny_model), "--enable-admin-api", "--calibration-tokens", "8192"], env=env
        ) as server,
        httpx.Client(base_url=server.url, timeout=120) as client,
    ):
        reader, streamed = stream_in_background(client, long_stream)
        unpruned = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        level = client.post("/v1/routing", json={"prune_level": 0.25, "prune_method": "frequency"})
        at_level = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        metrics = samples(server.url)
        (plan_file,) = (cache / "plans").glob("*.json")  # the plan the switch made, cached
        refused = {
            "prune_level": client.post("/v1/routing", json={"prune_level": 1.5}),
            "prune_method": client.post("/v1/routing", json={"prune_level": 0.25, "prune_method": "nope"}),
            "prune_plan": client.post("/v1/routing", json={"prune_plan": str(tmp_path / "missing.json")}),
        }
        unchanged = client.get("/v1/routing").json()
        back = client.post("/v1/routing", json={"prune_level": 0})
        restored = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        by_file = client.post("/v1/routing", json={"prune_plan": str(plan_file)})
        from_file = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        reader.join(120)
    assert streamed[-1] == "data: [DONE]" and not any('"error"' in line for line in streamed)
    assert level.status_code == 200 and level.json()["prune_level"] == 0.25 and level.json()["generation"] == 1
    assert level.json()["prune_method"] == "frequency"
    plan = PruningPlan.load(plan_file)
    offline = LLM(tiny_model, dtype="float32", routing_policies=plan.routing_policies())
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    assert offline.generate([body["prompt"]], params, use_tqdm=False)[0].outputs[0].text == at_level == from_file
    assert at_level != unpruned and restored == unpruned
    (info,) = metrics["moe_serve_routing_config_info"]
    assert info[0]["prune_level"] == "0.25" and info[0]["prune_method"] == "frequency" and info[0]["generation"] == "1"
    for param, response in refused.items():
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    assert unchanged["generation"] == 1 and unchanged["prune_level"] == 0.25
    assert back.status_code == 200 and back.json()["prune_level"] == 0.0
    assert by_file.status_code == 200 and by_file.json()["prune_plan"] == str(plan_file)


def test_live_pruning_can_release_expert_weights_and_read_them_back(tiny_model: Path, own_cache: Path) -> None:
    """With --live-pruning-releases-experts a switch frees the removed experts' weights (the memory gauges show
    it) and switching back reads them from the checkpoint: the same tokens as before, no stream failed."""
    env = {**os.environ, "MOE_SERVE_CACHE": str(own_cache)}
    body = {"prompt": "Free my experts", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    args = [*SERVE_ARGS, "--model", str(tiny_model), "--enable-admin-api", "--live-pruning-releases-experts",
            "--calibration-tokens", "8192"]  # fmt: skip

    def memory(url: str) -> tuple[float, float]:
        metrics = samples(url)
        return metrics["moe_serve_model_weight_bytes"][0][1], metrics["moe_serve_released_expert_weight_bytes"][0][1]

    with launched(args, env=env) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        reader, streamed = stream_in_background(client, {**body, "max_tokens": 300, "stream": True})
        unpruned, start = client.post("/v1/completions", json=body).json()["choices"][0]["text"], memory(server.url)
        switched = client.post("/v1/routing", json={"prune_level": 0.25, "prune_method": "frequency"})
        pruned, at_level = client.post("/v1/completions", json=body).json()["choices"][0]["text"], memory(server.url)
        client.post("/v1/routing", json={"prune_level": 0})
        restored, back = client.post("/v1/completions", json=body).json()["choices"][0]["text"], memory(server.url)
        reader.join(120)
    assert switched.status_code == 200, switched.text
    assert streamed[-1] == "data: [DONE]" and not any('"error"' in line for line in streamed)
    assert start[1] == 0 and at_level[1] > 0 and at_level[0] == start[0] - at_level[1]  # a quarter of the experts
    assert back == start and restored == unpruned != pruned
