"""`moe-loadtest --live`: settings switched on one server in interleaved rounds, each scored as generated tokens
(forced_tokens through the server, equal to the offline forward), medians and ranges in the report."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch

from engine.attention import DenseCausal
from engine.checkpoint import load_model
from loadtests.live_sweep import live_sweep
from loadtests.locust_run import Workload
from loadtests.perplexity import served_continuation_perplexity
from loadtests.settings import ServerOptions, Setting, settings_grid
from pruning.data import split_windows
from pruning.spec import CalibrationSpec
from server.launch import launched

pytestmark = pytest.mark.slow  # servers under locust load

SERVER = ServerOptions(threads=1, max_num_seqs=8, ready_timeout_s=120)


def test_continuation_perplexity_through_the_server_equals_the_offline_forward(tiny_model: Path) -> None:
    windows = split_windows(tiny_model, "test", 63, 63 * 4)
    prompt_len = 40
    model = load_model(tiny_model, torch.float32, torch.device("cpu")).eval()
    windows[0, prompt_len + 3] = model.config.eos_token_ids[0]  # an end of document inside a window is scored too
    rows, seq_len = windows.shape[0], windows.shape[1] - 1
    with torch.no_grad():
        positions = torch.arange(seq_len).repeat(rows)
        hidden = model(windows[:, :-1].reshape(-1), positions, DenseCausal(rows, seq_len))
        logprobs = torch.log_softmax(model.compute_logits(hidden), -1).view(rows, seq_len, -1)
    targets = windows[:, prompt_len:]
    offline = -logprobs[:, prompt_len - 1 :].gather(-1, targets.unsqueeze(-1)).mean().item()
    with launched(replace(SERVER, dtype="float32").args(tiny_model)) as server:
        served = served_continuation_perplexity(server.url, tiny_model.name, windows, prompt_len, concurrency=4)
        body = {"prompt": [1, 2, 3], "forced_tokens": [5, 6], "logprobs": 0}
        too_many = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 3})
        outside = httpx.post(f"{server.url}/v1/completions", json={**body, "forced_tokens": [10**6]})
        forced = httpx.post(f"{server.url}/v1/completions", json=body).json()["choices"][0]
    assert served.tokens == targets.numel()
    assert served.loss == pytest.approx(offline, rel=1e-5)
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "max_tokens"
    assert outside.status_code == 400 and outside.json()["error"]["param"] == "forced_tokens"
    assert forced["logprobs"]["tokens"] and len(forced["logprobs"]["token_logprobs"]) == 2  # max_tokens: their number


def test_a_live_sweep_interleaves_rounds_on_one_server_and_reports_medians(tiny_model: Path, tmp_path: Path) -> None:
    settings = settings_grid(["frequency"], [0.5], [], [(1, -1.0)])
    assert [s.name for s in settings] == ["none", "frequency-0.5", "sub1@-1"]
    workload = Workload(prompt_tokens="8-32", output_tokens="4-8", duration_s=2, max_requests=40)
    rows = live_sweep(
        [tiny_model], settings, [2], 2, workload, SERVER, tmp_path, ppl_windows=4,
        spec=CalibrationSpec(max_tokens=2048, sample_tokens=256), cache_dir=tmp_path / "cache",
    )  # fmt: skip
    assert [(r["round"], r["setting"]) for r in rows] == [(0, s.name) for s in settings] + [
        (1, s.name) for s in settings
    ]
    assert all(r["requests"] > 0 and r["failures"] == 0 and r["output_tokens_per_s"] > 0 for r in rows)
    ppl = {r["setting"]: r["perplexity"] for r in rows}
    assert all(math.isfinite(value) and value > 1 for value in ppl.values())
    assert ppl["frequency-0.5"] != ppl["none"] and ppl["sub1@-1"] != ppl["none"]
    assert len({r["weight_mib"] for r in rows}) == 1  # one server, every expert kept loaded
    with open(tmp_path / "results.csv") as f:
        assert [row["setting"] for row in csv.DictReader(f)] == [r["setting"] for r in rows]
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["rounds"] == 2
    table = (tmp_path / "results.md").read_text()
    assert "| sub1@-1 | 2 | 2 |" in table and "1.00x" in table  # users, rounds; none against itself
    assert (tmp_path / "throughput_vs_perplexity.png").read_bytes().startswith(b"\x89PNG")
    assert Setting("substitution", keep_top=1, min_similarity=-1.0).routing_body(None) == {
        "route_threshold": 0.0, "substitution": {"keep_top": 1, "min_similarity": -1.0}, "prune_level": 0.0,
    }  # fmt: skip
