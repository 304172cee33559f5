"""The Prometheus config and the Grafana dashboard against real programs: promtool checks the config, and a real
Prometheus, configured from the repository's file, scrapes a real moe-serve under streaming and non-streaming
traffic while every PromQL expression of the dashboard runs against it and must return finite values."""

from __future__ import annotations

import asyncio
import math
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from server.launch import LaunchedServer, free_port, launched, stop
from tests.docker.deploy_files import (
    DEPLOY_DOC,
    LABEL_VALUES,
    METRIC_NAME,
    PROMETHEUS_CONFIG,
    load_dashboard,
    load_yaml,
    panel_queries,
    require_binary,
    substitute,
    variable_query,
)

pytestmark = pytest.mark.slow  # real Prometheus and the dashboards

SERVED_NAME = "tiny-moe"
SCRAPE_INTERVAL = "1s"
# Grafana's built-in intervals, as Grafana would expand them for a short dashboard range over this scrape interval.
BUILTINS = {"__rate_interval": "15s", "__range": "5m", "__range_s": "300", "__interval": "2s", "__interval_ms": "2000"}
TRAFFIC_SECONDS = 4.0
CLIENTS = 6


def test_promtool_accepts_the_config() -> None:
    promtool = require_binary("promtool", "prometheus", "MOE_SERVE_REQUIRE_PROMETHEUS")
    done = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def local_config(port: int) -> dict[str, Any]:
    """The repository's Prometheus config with only the moe-serve target and the scrape interval changed."""
    config = load_yaml(PROMETHEUS_CONFIG)
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "moe-serve"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    job["scrape_interval"] = SCRAPE_INTERVAL
    job["scrape_timeout"] = SCRAPE_INTERVAL
    config["scrape_configs"] = [job]
    return config


def query(prometheus: str, expr: str) -> dict[str, Any]:
    """Prometheus's instant-query answer (status, data or error) for expr at the current time."""
    return httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()


def values(answer: dict[str, Any]) -> list[float]:
    data = answer["data"]
    if data["resultType"] == "scalar":
        return [float(data["result"][1])]
    return [float(sample["value"][1]) for sample in data["result"]]


def wait_for(prometheus: str, expr: str, wanted: float, timeout: float = 20.0) -> None:
    """Poll until expr's only value is `wanted` (a target up, a counter scraped at its final value)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = query(prometheus, expr)
        if answer["status"] == "success" and values(answer) == [wanted]:
            return
        time.sleep(0.2)
    raise AssertionError(f"{expr} did not become {wanted} within {timeout:g} s: {answer}")


async def client(url: str, number: int, stop_at: float) -> None:
    """One client sending alternately non-streaming and streaming completions until stop_at."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        request = 0
        while time.monotonic() < stop_at:
            body = {
                "model": SERVED_NAME,
                "prompt": f"Client {number} asks question {request}:",
                "max_tokens": 8 + (number * 5 + request) % 17,
                "temperature": 0.8,
                "seed": number * 1000 + request,
            }
            if request % 2:
                body["stream"] = True
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    assert response.status_code == 200
                    lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
                    assert lines[-1] == "data: [DONE]"
            else:
                response = await http.post("/v1/completions", json=body)
                assert response.status_code == 200, response.text
            request += 1


async def drive_traffic(url: str) -> None:
    stop_at = time.monotonic() + TRAFFIC_SECONDS
    await asyncio.gather(*(client(url, number, stop_at) for number in range(CLIENTS)))


def final_value(exposition: str, sample: str) -> float:
    (line,) = [line for line in exposition.splitlines() if line.startswith(sample + "{")]
    return float(line.rsplit(" ", 1)[1])


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[LaunchedServer]:
    args = ["--model", str(tiny_model), "--served-model-name", SERVED_NAME, "--threads", "1"]
    args += ["--max-num-seqs", "16", "--kv-cache-memory-bytes", str(64 << 20)]
    with launched(args) as running:
        yield running


@pytest.fixture(scope="module")
def exposition(server: LaunchedServer) -> str:
    """The server's /metrics after one completion (every family is declared from the start; this fills them)."""
    body = {"model": SERVED_NAME, "prompt": "Once upon a time", "max_tokens": 4}
    assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200
    return httpx.get(f"{server.url}/metrics", timeout=10).text


@pytest.fixture(scope="module")
def prometheus(server: LaunchedServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a Prometheus scraping the server, after a few seconds of concurrent traffic, with the last
    scrape taken after the traffic ended."""
    binary = require_binary("prometheus", "prometheus", "MOE_SERVE_REQUIRE_PROMETHEUS")
    tmp = tmp_path_factory.mktemp("prometheus")
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump(local_config(server.port)))
    url = f"http://127.0.0.1:{free_port()}"
    with open(tmp / "prometheus.log", "wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address={url.removeprefix('http://')}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, (tmp / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "Prometheus was not ready after 20 s"
            time.sleep(0.1)
        wait_for(url, 'up{job="moe-serve"}', 1.0)
        asyncio.run(drive_traffic(server.url))
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        wait_for(url, "moe_serve_generation_tokens_total", final_value(metrics, "moe_serve_generation_tokens_total"))
        yield url
    finally:
        stop(process, 10.0)


def resolve_variables(prometheus: str, dashboard: dict[str, Any]) -> dict[str, str]:
    """Each template variable's label_values query run as Grafana runs it (label values of the matching
    series), in dashboard order; a variable takes its `All` value where it has one, else its first value."""
    resolved = dict(BUILTINS)
    for variable in dashboard["templating"]["list"]:
        match = LABEL_VALUES.match(variable_query(variable))
        assert match, f"variable {variable['name']}: expected label_values(selector, label)"
        selector, label = substitute(match.group(1), resolved), match.group(2)
        answer = httpx.get(f"{prometheus}/api/v1/label/{label}/values", params={"match[]": selector}, timeout=10).json()
        assert answer["status"] == "success" and answer["data"], f"variable {variable['name']}: {answer}"
        if variable.get("includeAll") and variable.get("allValue"):
            resolved[variable["name"]] = variable["allValue"]
        else:
            resolved[variable["name"]] = min(answer["data"])
    return resolved


def test_every_dashboard_query_returns_finite_values(prometheus: str) -> None:
    dashboard = load_dashboard()
    resolved = resolve_variables(prometheus, dashboard)
    assert resolved["model_name"] == SERVED_NAME
    queries = panel_queries(dashboard)
    assert len(queries) >= 20
    failures = []
    for title, expr in queries:
        answer = query(prometheus, substitute(expr, resolved))
        if answer["status"] != "success":
            failures.append(f"{title}: {expr}: {answer.get('error')}")
        elif not any(math.isfinite(value) for value in values(answer)):
            failures.append(f"{title}: {expr}: no finite value in {answer['data']['result']}")
    assert not failures, "\n".join(failures)


def test_the_dashboard_uses_only_metrics_the_server_exposes(exposition: str) -> None:
    exposed = {line.split("{")[0].split(" ")[0] for line in exposition.splitlines() if line[:1].isalpha()}
    used = {name for _, expr in panel_queries(load_dashboard()) for name in METRIC_NAME.findall(expr)}
    variables = load_dashboard()["templating"]["list"]
    used |= {name for variable in variables for name in METRIC_NAME.findall(variable_query(variable))}
    assert used - exposed == set()


def test_the_deploy_doc_lists_every_metric_family_with_its_type(exposition: str) -> None:
    exposed = dict(re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.MULTILINE))
    documented = dict(re.findall(r"^\| `(moe_serve_\w+)` \| (\w+) \|", DEPLOY_DOC.read_text(), re.MULTILINE))
    assert documented == exposed
