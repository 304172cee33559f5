"""pruning.frontier end to end on a tiny model: every setting measured, substitution reading fewer experts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pruning.frontier import main, summary


def test_a_small_frontier_run_writes_its_table_and_plot(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "frontier.json"
    main([
        str(tiny_model), "--rounds", "1", "--batch-sizes", "4", "--keep-top", "1", "--min-similarity", "-1",
        "--thresholds", "0.3", "--static", "frequency", "--prompt-len", "8", "--forced-len", "12",
        "--max-tokens", "1024", "--calibration-tokens", "2048", "--sample-tokens", "256", "--dtype", "float32",
        "--threads", "1", "--json", str(out), "--plot", str(tmp_path / "frontier.png"),
    ])  # fmt: skip
    rows = {row["setting"]: row for row in summary(json.loads(out.read_text()))}
    assert set(rows) == {"none", "substitute keep 1, sim >= -1", "threshold 0.3", "1 experts/token", "frequency 0.25"}
    assert all(row["tok_s"] > 0 and math.isfinite(row["ppl"]) for row in rows.values())
    # Any similarity accepted, one kept slot per token: a step reads at most the batch's 4 first choices.
    assert rows["substitute keep 1, sim >= -1"]["experts_read"] <= 4 < rows["none"]["experts_read"]
    assert rows["substitute keep 1, sim >= -1"]["ppl"] != rows["none"]["ppl"]
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 4 | none |" in capsys.readouterr().out
