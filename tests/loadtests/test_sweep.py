"""Load tests end to end against real servers: perplexity through the API equals the offline pass, and a short
sweep (two settings, a few seconds each) writes a table with positive throughput and finite perplexity, and a PNG."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_model
from loadtests.locust_run import Workload, run_locust
from loadtests.perplexity import served_perplexity
from loadtests.settings import ServerOptions, Setting, settings_grid
from loadtests.sweep import main, sweep
from measures.perplexity import perplexity
from pruning.data import split_windows
from pruning.spec import CalibrationSpec
from server.launch import launched

pytestmark = pytest.mark.slow  # servers under locust load

SERVER = ServerOptions(threads=1, max_num_seqs=8, ready_timeout_s=120)


def test_perplexity_through_the_server_equals_the_offline_pass(tiny_model: Path) -> None:
    """In float32 (dtype auto serves bf16 on CPUs with native bf16), so the two passes agree to rounding."""
    windows = split_windows(tiny_model, "test", 127, 127 * 6)
    offline = perplexity(load_model(tiny_model, torch.float32, torch.device("cpu")).eval(), windows)
    with launched(replace(SERVER, dtype="float32").args(tiny_model)) as server:
        served = served_perplexity(server.url, tiny_model.name, windows, windows_per_request=4)
    assert served.tokens == offline.tokens == 6 * 127
    assert served.loss == pytest.approx(offline.loss, rel=1e-5)


def test_a_locust_run_stops_at_its_request_budget(tiny_model: Path, tmp_path: Path) -> None:
    workload = Workload(prompt_tokens="4-16", output_tokens="2-4", duration_s=120, max_requests=6, chat_share=0.5)
    with launched(SERVER.args(tiny_model)) as server:
        result = run_locust(server.url, 3, workload, tmp_path, tokenizer=tiny_model / "tokenizer.json")
    assert (result.requests, result.failures) == (6, 0)
    assert result.duration_s < 60 and result.output_tokens_per_s > 0 and result.ttft_ms[50] > 0
    locust_stats = json.loads((tmp_path / "locust-u3-stats.json").read_text())  # locust's own statistics too
    assert {(e["method"], e["name"]) for e in locust_stats} >= {
        ("POST", "/v1/completions"),
        ("TTFT", "/v1/completions"),
    }
    assert sum(e["num_requests"] for e in locust_stats if e["method"] == "POST") == 6


def test_short_sweep_writes_rows_with_throughput_and_perplexity_and_a_plot(tiny_model: Path, tmp_path: Path) -> None:
    settings = settings_grid(["frequency"], [0.0, 0.5], [])
    assert settings == [Setting("none"), Setting("frequency", 0.5)]
    workload = Workload(prompt_tokens="8-32", output_tokens="4-8", duration_s=3, max_requests=60)
    rows = sweep(
        [tiny_model], settings, [2], workload, SERVER, tmp_path, ppl_tokens=1024,
        spec=CalibrationSpec(max_tokens=2048, sample_tokens=256), cache_dir=tmp_path / "cache", rounds=2,
    )  # fmt: skip
    assert [(r["round"], r["method"], r["level"]) for r in rows] == [
        (0, "none", 0.0), (0, "frequency", 0.5), (1, "none", 0.0), (1, "frequency", 0.5),
    ]  # fmt: skip
    assert [r["perplexity"] for r in rows[2:]] == [r["perplexity"] for r in rows[:2]]  # scored in round 1
    rows = rows[:2]
    for row in rows:
        assert row["requests"] > 0 and row["failures"] == 0
        assert row["requests_per_s"] > 0 and row["output_tokens_per_s"] > 0
        assert row["ttft_p50_ms"] > 0 and row["itl_p50_ms"] > 0 and row["peak_memory_mib"] > 0
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1 and row["ppl_tokens"] > 0
    unpruned, pruned = rows
    assert pruned["weight_mib"] < unpruned["weight_mib"]  # the plan's experts were released by the server
    assert pruned["perplexity"] != unpruned["perplexity"]
    with open(tmp_path / "results.csv") as f:
        assert [row["method"] for row in csv.DictReader(f)] == ["none", "frequency"] * 2
    assert json.loads((tmp_path / "results.json").read_text())["rows"][:2] == rows
    assert (tmp_path / "throughput_vs_perplexity.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "plans" / f"{tiny_model.name}-frequency-0.5.json").is_file()


def test_bad_sweep_input_exits_1_before_any_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "-o", str(tmp_path / "out")]) == 1
    assert "config.json" in capsys.readouterr().err
    assert main(["--methods", "magic", "-o", str(tmp_path / "out")]) == 1
    assert "unknown pruning method 'magic'" in capsys.readouterr().err
    assert main(["--output-tokens", "10-2", "-o", str(tmp_path / "out")]) == 1
    assert "length distribution '10-2'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
