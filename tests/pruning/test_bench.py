"""pruning.bench run as a user runs it: each level in its own process, the levels decoding in turns, a table and
the raw numbers written, and the workers ended cleanly (no semaphores left for the resource tracker to report)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow  # two compiled engines in two fresh processes (~60 s)
def test_a_pruned_level_holds_fewer_weights_and_its_workers_end_cleanly(
    tiny_model: Path, own_cache: Path, tmp_path: Path
) -> None:
    raw = tmp_path / "levels.json"
    run = subprocess.run(
        [sys.executable, "-m", "pruning.bench", str(tiny_model), "--levels", "0,0.5", "--batch-sizes", "1,4",
         "--repeats", "2", "--steps", "3", "--threads", "1", "--kv-bytes", str(8 << 20),
         "--json", str(raw)],
        env={**os.environ, "MOE_SERVE_CACHE": str(own_cache)}, capture_output=True, text=True, timeout=600,
        check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "leaked semaphore" not in run.stderr
    full, half = json.loads(raw.read_text())["rows"]
    assert half["kept_experts"] == full["kept_experts"] // 2
    assert half["weight_bytes"] < full["weight_bytes"] and half["released_expert_bytes"] > 0
    # Each level's process loads only its engine (a pruned level reads its plan from the cache), so the levels'
    # memory at load differs by about their weights (here 0.3 MB of ~110 MB). A pruned level that loaded the model
    # for its plan first measured 59% of level 0's: its engine reused the memory the model had freed.
    assert half["rss_load_delta_bytes"] > 0.8 * full["rss_load_delta_bytes"]
    assert all(row[f"decode_step_ms_b{b}"] > 0 and half[f"speedup_b{b}"] > 0 for row in (full, half) for b in (1, 4))
    assert full["speedup_b1"] == full["speedup_b4"] == 1.0  # level 0 against itself, block by block
    assert "| 0.5 |" in run.stdout
