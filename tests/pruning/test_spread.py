"""The spread of a method's cost over calibration folds: folds are disjoint and seeded, every method plans on
every fold, a plan is scored once however many folds choose it, and costs are relative to the unpruned model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_model
from pruning.generalization import main
from pruning.report import fold_cost_plot
from pruning.spec import PlanSpec
from pruning.spread import (
    PlanScorer,
    calibration_folds,
    differences,
    differences_markdown,
    fold_study,
    plan_overlap,
    relative_costs,
    summary,
    summary_markdown,
)


def test_folds_deal_every_window_once_by_a_seeded_permutation() -> None:
    windows = torch.arange(11 * 3).reshape(11, 3)
    folds = calibration_folds(windows, 3, seed=1)
    assert [len(fold) for fold in folds] == [4, 4, 3]
    assert sorted(int(row[0]) for fold in folds for row in fold) == [int(row[0]) for row in windows]
    assert all(torch.equal(a, b) for a, b in zip(folds, calibration_folds(windows, 3, seed=1), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(folds, calibration_folds(windows, 3, seed=2), strict=True))
    with pytest.raises(ValueError, match="need 2..11 folds"):
        calibration_folds(windows, 12)


def test_summary_is_the_mean_and_spread_of_relative_costs() -> None:
    base = {"test": 10.0, "outside": 100.0}
    rows = [
        {"model": "m", "method": "pes", "fold": i, "ppl": {"test": test, "outside": out}, "base": base, "removed": {}}
        for i, (test, out) in enumerate([(11.0, 110.0), (12.0, 130.0)])
    ]
    assert relative_costs(rows[0]) == pytest.approx({"test": 10.0, "outside": 10.0})
    (entry,) = summary(rows)
    assert entry["folds"] == 2 and entry["test"]["values"] == pytest.approx([10.0, 20.0])
    assert entry["test"]["mean"] == pytest.approx(15.0) and entry["test"]["std"] == pytest.approx(50**0.5)
    assert entry["outside"]["mean"] == pytest.approx(20.0)
    assert "| m | pes | 2 | +15.0% ± 7.1 | +20.0% ± 14.1 | 1.00 |" in summary_markdown([entry])


def test_methods_compare_fold_by_fold_and_plans_by_overlap() -> None:
    base = {"test": 10.0}

    def row(method: str, fold: int, ppl: float, removed: list[int]) -> dict[str, object]:
        return {
            "model": "m",
            "method": method,
            "fold": fold,
            "ppl": {"test": ppl},
            "base": base,
            "removed": {"0": removed},
        }

    rows = [
        row("pes", 0, 11.0, [1, 2]),
        row("reap", 1, 14.0, [1, 2]),
        row("pes", 1, 13.0, [1, 3]),
        row("reap", 0, 11.5, [1, 2]),
    ]
    assert plan_overlap([rows[0], rows[2]]) == pytest.approx(1 / 3)  # {1,2} and {1,3}: one of three shared
    (reap,) = differences(rows)  # folds pair by number, whatever the rows' order: +5 and +10 points
    assert (reap["method"], reap["reference"]) == ("reap", "pes")
    assert reap["test"]["values"] == pytest.approx([5.0, 10.0]) and reap["test"]["se"] == pytest.approx(2.5)
    assert "| m | reap - pes | +7.5 ± 2.5 |" in differences_markdown([reap])
    assert [entry["overlap"] for entry in summary(rows)] == pytest.approx([1 / 3, 1.0])


def test_the_spread_plot_is_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    base = {"test": 10.0, "outside": 100.0}
    rows = [
        {
            "model": model,
            "method": method,
            "fold": i,
            "ppl": {"test": 11.0 + i, "outside": 120.0 - i},
            "base": base,
            "removed": {},
        }
        for model in ("a", "b")
        for method in ("pes", "reap")
        for i in range(3)
    ]
    out = fold_cost_plot(summary(rows[:-3]), tmp_path / "spread.png")  # model b lacks reap: a gap, no error
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_method_plans_on_every_fold_and_a_plan_is_scored_once(tiny_model: Path) -> None:
    model = load_model(tiny_model, torch.float32, torch.device("cpu")).eval()
    windows = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(0))
    scorer = PlanScorer(model, {"test": windows[:2], "outside": windows[2:]})
    specs = {"frequency": PlanSpec("frequency", 0.25), "random": PlanSpec("random", 0.25)}
    with torch.no_grad():
        rows = fold_study(tiny_model, model, calibration_folds(windows, 2), scorer, specs, sample_tokens=16)
    assert [(row["fold"], row["method"]) for row in rows] == [
        (0, "frequency"),
        (0, "random"),
        (1, "frequency"),
        (1, "random"),
    ]
    assert rows[1]["ppl"] == rows[3]["ppl"]  # random's seeded plan is the same on both folds: scored once
    assert len(scorer.scored) == len({str(row["removed"]) for row in rows})
    assert all(len(experts) == 2 for row in rows for experts in row["removed"].values())


def test_generalization_subsets_end_to_end(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = []
    for name, text in (
        ("prose.txt", "The quick brown fox jumps over the lazy dog. " * 40),
        ("manual.txt", "Press i to insert text. " * 60),
    ):
        (tmp_path / name).write_text(text)
        texts.append(str(tmp_path / name))
    fast = ["--seq-len", "32", "--calibration-tokens", "1024", "--sample-tokens", "64", "--max-eval-tokens", "256"]
    out = tmp_path / "rows.json"
    main([str(tiny_model), "--subsets", "2", "--methods", "frequency,reap", "--files", texts[0], "--files", texts[1],
          *fast, "--json", str(out), "--plot", str(tmp_path / "folds.png")])  # fmt: skip
    rows = json.loads(out.read_text())
    assert [(row["fold"], row["method"]) for row in rows] == [
        (0, "frequency"),
        (0, "reap"),
        (1, "frequency"),
        (1, "reap"),
    ]
    assert all(set(row["ppl"]) == {"test", "outside", "outside2"} for row in rows)
    printed = capsys.readouterr().out
    assert "| frequency | 2 |" in printed and "| reap - frequency |" in printed
    assert (tmp_path / "folds.png").read_bytes()[:4] == b"\x89PNG"
