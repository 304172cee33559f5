"""engine.bench run as a user runs it, on a tiny model it writes: the floor table's numbers hold together."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def test_each_floor_is_at_the_bandwidth_measured_beside_its_steps(tmp_path: Path) -> None:
    raw = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "engine.bench", "--make-model", str(tmp_path / "model"), "--layers", "1", "--hidden",
         "64", "--heads", "2", "--kv-heads", "1", "--experts", "4", "--expert-width", "64", "--top-k", "2", "--vocab",
         "512", "--no-hf", "--batch-sizes", "1,2", "--repeats", "1", "--threads", "1", "--output-len", "4",
         "--decode-steps", "4", "--prompt-len", "4", "--enforce-eager", "--json", str(raw)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
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
