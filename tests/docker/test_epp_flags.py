"""docker/gateway/epp-flags.yaml, the flags that point the Gateway API Inference Extension's endpoint picker
(EPP) at moe-serve's metrics, checked against a running server: every metric named is on /metrics as a gauge
(the EPP reads each as a gauge) with exactly one series that the flag's selector matches, and under load the
queue, running and KV-cache gauges move as the EPP expects. docs/deploy.md's EPP args must be the same values."""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Iterator

import httpx
import pytest

from engine.config import DEFAULT_MODEL_DIR
from server.launch import LaunchedServer, launched
from tests.docker.deploy_files import DEPLOY_DOC, EPP_FLAGS, load_yaml

pytestmark = pytest.mark.slow  # a real server

# The EPP's model-server metric flags (pkg/epp/server/options) and whether a server may leave one off (empty):
# queue depth, running requests and KV-cache usage are the model server protocol's required metrics.
EPP_METRIC_FLAGS = {
    "total-queued-requests-metric": False,
    "total-running-requests-metric": False,
    "kv-cache-usage-percentage-metric": False,
    "lora-info-metric": True,
    "cache-info-metric": True,
}
# The EPP's metric spec: a name with an optional {label=value,...} selector.
METRIC_SPEC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^{}]+)\})?$")
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
DOC_FLAG = re.compile(r"--([a-z-]+-metric)=([^\"\s]*)")
DOC_TABLE_ROW = re.compile(r"^\| `--([a-z-]+-metric)` \| `[^`]+` \| (?:`(moe_serve_\w+)`|empty: off\b)", re.MULTILINE)


def flags() -> dict[str, str]:
    return {flag: str(value) for flag, value in load_yaml(EPP_FLAGS).items()}


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """(metric name, label selector) as the EPP reads a metric flag; AssertionError where it would refuse."""
    match = METRIC_SPEC.match(spec.strip())
    assert match, f"{spec!r} is not a metric spec the EPP accepts"
    pairs = [pair.split("=") for pair in match.group(2).split(",")] if match.group(2) else []
    assert all(len(pair) == 2 and pair[0].strip() and pair[1].strip() for pair in pairs), spec
    return match.group(1), {name.strip(): value.strip() for name, value in pairs}


def samples(exposition: str, name: str, selector: dict[str, str]) -> list[float]:
    """Values of the series of `name` whose labels include `selector`."""
    values = []
    for line in exposition.splitlines():
        match = SAMPLE.match(line)
        if match and match.group(1) == name and selector.items() <= dict(LABEL.findall(match.group(2) or "")).items():
            values.append(float(match.group(3)))
    return values


def metric_types(exposition: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.MULTILINE))


@pytest.fixture(scope="module")
def server() -> Iterator[LaunchedServer]:
    """One sequence at a time, so that concurrent requests queue."""
    args = ["--model", str(DEFAULT_MODEL_DIR), "--threads", "1", "--max-num-seqs", "1"]
    with launched(args) as running:
        yield running


def scrape(server: LaunchedServer) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=10).text


def test_the_file_sets_every_metric_flag_of_the_epp() -> None:
    assert set(flags()) == set(EPP_METRIC_FLAGS)
    for flag, value in flags().items():
        assert value or EPP_METRIC_FLAGS[flag], f"--{flag} is required by the model server protocol"
        if value:
            name, _ = parse_spec(value)
            assert name.startswith("moe_serve_"), f"--{flag}={value}: not a moe-serve metric"


def test_every_named_metric_is_one_gauge_series_on_a_live_server(server: LaunchedServer) -> None:
    exposition = scrape(server)
    types = metric_types(exposition)
    for flag, value in flags().items():
        if not value:
            continue
        name, selector = parse_spec(value)
        assert types.get(name) == "gauge", f"--{flag}={value}: {name} is {types.get(name)} on /metrics"
        (sample,) = samples(exposition, name, selector)  # the EPP needs exactly one matching series
        assert math.isfinite(sample) and sample >= 0, f"--{flag}={value}: {sample}"
    kv_name, kv_selector = parse_spec(flags()["kv-cache-usage-percentage-metric"])
    assert samples(exposition, kv_name, kv_selector) == [0.0]  # idle: a fraction, 0 to 1


def test_the_gauges_follow_queued_and_running_requests(server: LaunchedServer) -> None:
    """Three long streams on a server that runs one sequence at a time: while they run, the queue flag's metric
    counts the waiting ones, the running flag's the one running, and the KV flag's is a fraction above 0."""
    specs = {flag: parse_spec(flags()[flag]) for flag in EPP_METRIC_FLAGS if flags()[flag]}

    def value(flag: str, exposition: str) -> float:
        name, selector = specs[flag]
        (sample,) = samples(exposition, name, selector)
        return sample

    async def stream(http: httpx.AsyncClient, number: int) -> None:
        body = {"prompt": f"Stream {number}:", "max_tokens": 200, "ignore_eos": True, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for _ in response.aiter_raw():
                pass

    async def highest_while_streaming() -> dict[str, float]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            streams = asyncio.gather(*(stream(http, number) for number in range(3)))
            highest = dict.fromkeys(specs, 0.0)
            while not streams.done():
                exposition = (await http.get("/metrics")).text
                now = {flag: value(flag, exposition) for flag in specs}
                assert now["total-running-requests-metric"] <= 1, now
                assert 0 <= now["kv-cache-usage-percentage-metric"] <= 1, now
                highest = {flag: max(highest[flag], now[flag]) for flag in specs}
                await asyncio.sleep(0.02)
            await streams
            return highest

    highest = asyncio.run(highest_while_streaming())
    assert highest["total-queued-requests-metric"] >= 1, highest
    assert highest["total-running-requests-metric"] == 1, highest
    assert 0 < highest["kv-cache-usage-percentage-metric"] <= 1, highest
    deadline = time.monotonic() + 10
    while any(value(flag, scrape(server)) for flag in specs):
        assert time.monotonic() < deadline, f"the gauges did not return to 0: {scrape(server)}"
        time.sleep(0.1)


def test_the_deploy_doc_passes_the_same_flags() -> None:
    doc = DEPLOY_DOC.read_text()
    assert dict(DOC_FLAG.findall(doc)) == flags()  # the EPP args
    assert dict(DOC_TABLE_ROW.findall(doc)) == flags()  # the table: a moe-serve metric, or "empty: off"
