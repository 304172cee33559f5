"""engine.bench run as a user runs it, on a tiny model it writes: the floor table's numbers hold together, and
engine.floor_plot draws the run's --json file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One engine.bench run on a tiny model it writes: its output and its --json file."""
    tmp_path = tmp_path_factory.mktemp("bench")
    raw = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "engine.bench", "--make-model", str(tmp_path / "model"), "--layers", "1", "--hidden",
         "64", "--heads", "2", "--kv-heads", "1", "--experts", "4", "--expert-width", "64", "--top-k", "2", "--vocab",
         "512", "--no-hf", "--batch-sizes", "1,2", "--repeats", "1", "--threads", "1", "--output-len", "4",
         "--decode-steps", "4", "--prompt-len", "4", "--enforce-eager", "--json", str(raw)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return run, raw


def test_each_floor_is_at_the_bandwidth_measured_beside_its_steps(
    bench_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    run, raw = bench_run
    result = json.loads(raw.read_text())
    assert [row["batch"] for row in result["decode"]] == [1, 2]
    for row in result["decode"]:
        bandwidth = row["copy_bandwidth_bytes_s"]
        assert bandwidth > 1e8  # a copy's bytes per second, measured beside this batch's steps
        assert row["floor_ms"] == pytest.approx(1e3 * row["bytes"] / bandwidth)
        assert row["fraction_of_floor"] == pytest.approx(row["floor_ms"] / row["step_ms"])
        read = row["read_bandwidth_bytes_s"]  # a sum's bytes per second, measured beside the same steps
        assert read > 1e8
        assert row["fraction_of_read_floor"] == pytest.approx(1e3 * row["bytes"] / read / row["step_ms"])
        assert f"| {row['batch']} | {row['step_ms']:.2f} |" in run.stdout
    assert "| copy GB/s |" in run.stdout and "| read GB/s | of the read floor |" in run.stdout


def test_floor_plot_draws_a_run_and_names_a_file_that_is_not_one(
    bench_run: tuple[subprocess.CompletedProcess[str], Path], tmp_path: Path
) -> None:
    _, raw = bench_run
    png = tmp_path / "floors.png"
    drawn = subprocess.run(
        [sys.executable, "-m", "engine.floor_plot", str(png), str(raw)], capture_output=True, text=True, check=False
    )
    assert drawn.returncode == 0, drawn.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    breakdown = tmp_path / "breakdown.json"
    breakdown.write_text("[]")
    refused = subprocess.run(
        [sys.executable, "-m", "engine.floor_plot", str(tmp_path / "x.png"), str(breakdown)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert refused.returncode == 2 and "breakdown.json: no decode rows" in refused.stderr
    assert not (tmp_path / "x.png").exists()
