"""Does a pruning plan hold up off its calibration distribution?

`python -m pruning.generalization [MODEL ...] --files TEXT... [--files TEXT...] [--level 0.25] [--methods ...]
[--subsets K]`

Plans are made from the default calibration (the corpus's validation split) and scored on the corpus's test
split (in distribution) and on the given text files (out of it: prose the corpus has none of). Two diagnostics
say why a method travels badly: the share of the out-of-distribution text's routed slots that its removed
experts held (their work that must go elsewhere), and the same plan calibrated on the files themselves (an
oracle: it sees the evaluation text, so it bounds what a better calibration could recover).

With `--subsets K` each method instead plans on each of K disjoint folds of the calibration windows
(pruning/spread.py), and every `--files` set is scored on its own: costs as mean ± std over folds, so close
methods can be told apart from the calibration sample's noise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.checkpoint import load_model
from engine.config import DEFAULT_MODEL_DIR
from engine.model import MoEForCausalLM
from measures.perplexity import perplexity
from pruning.cache import DEFAULT_CACHE_DIR, cached_plan
from pruning.data import file_windows, split_windows
from pruning.plan import PruningPlan
from pruning.report import fold_cost_plot
from pruning.spec import CalibrationSpec, PlanSpec
from pruning.spread import (
    PlanScorer,
    calibration_folds,
    differences,
    differences_markdown,
    fold_study,
    scored,
    summary,
    summary_markdown,
)


def routed_counts(model: MoEForCausalLM, windows: torch.Tensor) -> np.ndarray:
    """[layers, experts] routed slots of the unpruned model on the windows."""
    model.expert_load.reset()
    perplexity(model, windows)
    return model.expert_load.snapshot()[:, : model.config.num_experts].numpy().astype(np.float64)


def removed_share(plan: PruningPlan, counts: np.ndarray) -> float:
    """The share of routed slots (all MoE layers) that went to experts the plan removes."""
    removed = sum(counts[layer, experts].sum() for layer, experts in plan.removed().items())
    return float(removed / sum(counts[layer].sum() for layer in plan.kept))


def study(
    model_dir: Path, files: list[Path], level: float, methods: list[str], seq_len: int, cache_dir: Path
) -> list[dict[str, Any]]:
    """A row per method and calibration: perplexity in and out of distribution, and the removed share."""
    model = load_model(model_dir, torch.float32, torch.device("cpu")).eval()
    inside = split_windows(model_dir, "test", seq_len)
    outside = file_windows(model_dir, files, seq_len)
    with torch.no_grad():
        base = {"in": perplexity(model, inside).ppl, "out": perplexity(model, outside).ppl}
        counts = {"in": routed_counts(model, inside), "out": routed_counts(model, outside)}
        rows = []
        for calibration, spec in (
            ("corpus", CalibrationSpec()),
            ("files (oracle)", CalibrationSpec(files=tuple(files))),
        ):
            for method in methods:
                plan = cached_plan(model_dir, model, PlanSpec(method, level, calibration=spec), cache_dir)
                policies = plan.routing_policies()
                ppl = {"in": scored(model, inside, policies), "out": scored(model, outside, policies)}
                rows.append({
                    "model": model_dir.resolve().name, "method": method, "calibration": calibration, "level": level,
                    "ppl_in": ppl["in"], "ppl_out": ppl["out"], "base_in": base["in"], "base_out": base["out"],
                    "removed_share_in": removed_share(plan, counts["in"]),
                    "removed_share_out": removed_share(plan, counts["out"]),
                    "tokens_in": inside[:, 1:].numel(), "tokens_out": outside[:, 1:].numel(),
                })  # fmt: skip
                print(_line(rows[-1]), flush=True)
    return rows


def subset_study(
    model_dir: Path,
    file_sets: list[list[Path]],
    level: float,
    methods: list[str],
    seq_len: int,
    options: argparse.Namespace,
) -> list[dict[str, Any]]:
    """A row per calibration fold and method: its removed experts, and the pruned and unpruned perplexity on the
    test split and on each outside set."""
    model = load_model(model_dir, torch.float32, torch.device("cpu")).eval()
    cap = options.max_eval_tokens
    sets = {"test": split_windows(model_dir, "test", seq_len, cap)}
    sets |= {_set_name(i): file_windows(model_dir, files, seq_len, cap) for i, files in enumerate(file_sets)}
    calibration = split_windows(model_dir, "validation", seq_len, options.calibration_tokens)
    folds = calibration_folds(calibration, options.subsets, options.fold_seed)
    with torch.no_grad():
        scorer = PlanScorer(model, sets)
        specs = {method: PlanSpec(method, level) for method in methods}
        return fold_study(model_dir, model, folds, scorer, specs, options.sample_tokens)


def _set_name(index: int) -> str:
    return "outside" if index == 0 else f"outside{index + 1}"


def _line(row: dict[str, Any]) -> str:
    return (
        f"| {row['model']} | {row['calibration']} | {row['method']} | {row['ppl_in']:.2f} "
        f"(+{row['ppl_in'] - row['base_in']:.2f}) | {row['ppl_out']:.2f} (+{row['ppl_out'] - row['base_out']:.2f}) "
        f"| {row['removed_share_in']:.1%} | {row['removed_share_out']:.1%} |"
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    header = (
        "| model | calibrated on | method | test ppl (cost) | outside ppl (cost) | removed share, test | "
        "removed share, outside |\n|---|---|---|---:|---:|---:|---:|\n"
    )
    return header + "\n".join(_line(row) for row in rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pruning.generalization", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "models", type=Path, nargs="*", default=[DEFAULT_MODEL_DIR, DEFAULT_MODEL_DIR.with_name("tiny-lbl")]
    )
    parser.add_argument(
        "--files",
        type=Path,
        nargs="+",
        action="append",
        required=True,
        help="UTF-8 text outside the corpus; repeat for more sets (scored apart with --subsets, together without)",
    )
    parser.add_argument("--level", type=float, default=0.25)
    parser.add_argument("--methods", default="pes,reap,frequency")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--subsets", type=int, default=0, help="plan on this many disjoint calibration folds")
    parser.add_argument("--fold-seed", type=int, default=0, help="the permutation dealing windows into folds")
    parser.add_argument(
        "--calibration-tokens", type=int, default=CalibrationSpec.max_tokens, help="of the split, dealt into folds"
    )
    parser.add_argument("--sample-tokens", type=int, default=CalibrationSpec.sample_tokens, help="per fold")
    parser.add_argument("--plot", type=Path, help="with --subsets: also draw the costs over folds here (PNG)")
    parser.add_argument("--max-eval-tokens", type=int, help="score at most this many tokens of each set (--subsets)")
    args = parser.parse_args(argv)
    methods, rows = args.methods.split(","), []
    if args.subsets:
        for model_dir in args.models:
            rows += subset_study(model_dir, args.files, args.level, methods, args.seq_len, args)
        summaries = summary(rows)
        print(summary_markdown(summaries))
        print(differences_markdown(differences(rows)))
        if args.plot:
            fold_cost_plot(summaries, args.plot)
    else:
        files = [file for group in args.files for file in group]
        for model_dir in args.models:
            rows += study(model_dir, files, args.level, methods, args.seq_len, args.cache_dir)
        print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
