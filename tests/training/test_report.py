"""The replication report: convergence arithmetic and plots from real (tiny) training runs."""

from __future__ import annotations

import json
from pathlib import Path

from tests.training.conftest import tiny_config
from training.report import main, tokens_to_reach
from training.trainer import Trainer


def test_tokens_to_reach_interpolates_between_evaluations() -> None:
    evals = [{"tokens": 0, "loss": 6.0}, {"tokens": 100, "loss": 4.0}, {"tokens": 200, "loss": 3.0}]
    assert tokens_to_reach(evals, 5.0) == 50.0
    assert tokens_to_reach(evals, 3.0) == 200.0
    assert tokens_to_reach(evals, 2.0) is None


def test_report_writes_plots_and_summary(small_corpus: Path, small_tokenizer: Path, tmp_path: Path) -> None:
    for method in ("simbal", "lbl"):
        Trainer(tiny_config(method=method, steps=8), tmp_path / method, small_tokenizer, small_corpus).run()
    out = tmp_path / "report"
    main([f"simbal={tmp_path / 'simbal'}", f"lbl={tmp_path / 'lbl'}", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["simbal"]["tokens"] == 8 * 4 * 32
    assert len(summary["lbl"]["final_pes"]) == 2
    assert "simbal_fraction_of_lbl_tokens_to_reach_lbl_final_loss" in summary
    for name in ("val_loss", "experts_in_use", "imbalance", "min_pes", "orthogonality"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
