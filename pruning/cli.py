"""`moe-prune`: measure expert redundancy, make pruning plans, write pruned checkpoints, evaluate what it costs.

moe-prune analyze MODEL [-o DIR]                         # per-layer PES, balance, most similar pairs, heatmap PNG
moe-prune plan MODEL --method pes --level 0.25 -o plan.json
moe-prune apply MODEL plan.json -o OUT                   # a smaller Hugging Face checkpoint
moe-prune eval MODEL [MODEL ...] --methods pes,reap,frequency,random --levels 0,0.125,0.25,0.375,0.5 -o DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from corpus.splits import CorpusError
from engine.checkpoint import load_model
from engine.command_line import HelpFormatter, command_parser
from engine.config import DEFAULT_MODEL_DIR, CheckpointError, ModelConfig
from engine.device import resolve_device, resolve_dtype
from engine.expert_placement import save_placement
from engine.model import MoEForCausalLM
from pruning import report
from pruning.apply import apply_plan
from pruning.cache import DEFAULT_CACHE_DIR, cached_calibration, cached_plan
from pruning.calibration import Calibration
from pruning.choices import BUDGETS, HANDLINGS
from pruning.data import split_windows
from pruning.evaluation import Variant, dropped_top_rows, pruning_rows, threshold_rows
from pruning.methods import METHODS
from pruning.placement import calibration_load, place, served_load
from pruning.plan import PlanError, PruningPlan
from pruning.spec import CalibrationSpec, PlanSpec

DEFAULT_LEVELS = "0,0.125,0.25,0.375,0.5"


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _load(args: argparse.Namespace, model_dir: Path) -> MoEForCausalLM:
    device = resolve_device(args.device)
    model = load_model(model_dir, resolve_dtype(args.dtype, device), device)
    return model.eval()


def _spec(args: argparse.Namespace) -> CalibrationSpec:
    return CalibrationSpec(
        split="validation",
        files=tuple(args.calibration_files or ()),
        max_tokens=args.calibration_tokens,
        seq_len=args.seq_len,
        sample_tokens=args.sample_tokens,
    )


def analysis(calibration: Calibration, top_pairs: int = 5) -> dict[str, Any]:
    """Per layer: PES, load balance of routed tokens, and the most similar expert pairs."""
    layers = []
    for layer in calibration.layers:
        load = layer.routed_tokens.astype(np.float64)
        upper = np.triu_indices(len(layer.similarity), k=1)
        order = np.argsort(-layer.similarity[upper])[:top_pairs]
        layers.append(
            {
                "layer": layer.layer,
                "pes": layer.pes,
                "max_over_mean_load": float(load.max() / load.mean()),
                "load_cv": float(load.std() / load.mean()),
                "idle_experts": int((load == 0).sum()),
                "similar_pairs": [
                    [int(upper[0][i]), int(upper[1][i]), float(layer.similarity[upper[0][i], upper[1][i]])]
                    for i in order
                ],
            }
        )
    return {"min_pes": calibration.min_pes, "tokens": calibration.layers[0].num_tokens, "layers": layers}


def cmd_analyze(args: argparse.Namespace) -> None:
    calibration = cached_calibration(args.model, _load(args, args.model), _spec(args), args.cache_dir)
    result = analysis(calibration)
    print(f"{args.model}: {result['tokens']} calibration tokens, min PES {result['min_pes']:.4f}")
    print(f"{'layer':>5} {'PES':>7} {'max/mean':>8} {'CV':>6} {'idle':>4}  most similar pairs (cosine)")
    for layer in result["layers"]:
        pairs = ", ".join(f"{a}-{b} {s:.3f}" for a, b, s in layer["similar_pairs"])
        print(
            f"{layer['layer']:>5} {layer['pes']:>7.4f} {layer['max_over_mean_load']:>8.2f} "
            f"{layer['load_cv']:>6.2f} {layer['idle_experts']:>4}  {pairs}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "analysis.json").write_text(json.dumps(result, indent=2) + "\n")
    title = f"{args.model.resolve().name}: mean pairwise cosine of expert outputs"
    print(
        f"wrote {args.out / 'analysis.json'} and {report.similarity_heatmap(calibration, title, args.out / 'similarity.png')}"
    )


def cmd_plan(args: argparse.Namespace) -> None:
    spec = PlanSpec(args.method, args.level, args.budget, args.handling, args.seed, _spec(args))
    plan = cached_plan(args.model, _load(args, args.model), spec, args.cache_dir)
    plan.save(args.out)
    kept = {layer: len(experts) for layer, experts in plan.kept.items()}
    print(
        f"wrote {args.out}: {plan.method} at level {plan.level:g} keeps {kept} of {plan.num_experts} experts per MoE layer"
    )


def cmd_place(args: argparse.Namespace) -> None:
    config = ModelConfig.from_dir(args.model)
    if args.load is not None:
        counts, source = served_load(config, args.load), f"the served load in {args.load}"
    else:
        calibration = cached_calibration(args.model, _load(args, args.model), _spec(args), args.cache_dir)
        counts, source = calibration_load(config, calibration), "calibration"
    placement, balanced, contiguous = place(config, counts, args.ranks)
    save_placement(placement, args.out)
    print(
        f"wrote {args.out}: {config.num_experts} experts per MoE layer on {args.ranks} ranks, placed by {source}; "
        f"busiest rank / mean load {balanced:.3f} (contiguous blocks: {contiguous:.3f})"
    )


def cmd_apply(args: argparse.Namespace) -> None:
    out = apply_plan(args.model, PruningPlan.load(args.plan), args.out)
    print(f"wrote {out}")


def cmd_eval(args: argparse.Namespace) -> None:
    variants = [Variant.parse(text) for text in args.methods.split(",")]
    results: dict[str, dict[str, Any]] = {}
    for model_dir in args.models:
        model = _load(args, model_dir)
        calibration = cached_calibration(model_dir, model, _spec(args), args.cache_dir)
        seq_len = min(args.seq_len, model.config.max_position_embeddings)
        windows = split_windows(model_dir, "test", seq_len, args.test_tokens)
        balancing = (model.router_balancing or {}).get("method", "unknown")
        result: dict[str, Any] = {
            "balancing": balancing,
            "test_tokens": int(windows[:, 1:].numel()),
            "min_pes": calibration.min_pes,
        }
        name = model_dir.resolve().name
        result["pruning"] = _progress(
            f"{name} levels",
            pruning_rows(
                model_dir, model, calibration, windows, variants, _floats(args.levels), args.seed, _spec(args)
            ),
        )
        result["thresholds"] = _progress(f"{name} thresholds", threshold_rows(model, windows, _floats(args.thresholds)))
        drops = [int(r) for r in _floats(args.dropped_top)]
        result["dropped_top"] = _progress(f"{name} dropped top", dropped_top_rows(model, windows, drops))
        results[name] = result
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(report.markdown(results))
    plots = [report.level_plot(results, args.out / "levels.png")]
    if any(r["thresholds"] for r in results.values()):
        plots.append(report.threshold_plot(results, args.out / "thresholds.png"))
    if any(r["dropped_top"] for r in results.values()):
        plots.append(report.dropped_top_plot(results, args.out / "dropped_top.png"))
    print(report.markdown(results))
    print("wrote", ", ".join(str(p) for p in [args.out / "results.json", args.out / "results.md", *plots]))


def _progress(label: str, rows: Any) -> list[dict[str, Any]]:
    done = []
    for row in rows:
        done.append(row)
        setting = {k: row[k] for k in ("variant", "level", "tau", "dropped_top") if k in row}
        print(f"[{label}] {setting}: ppl {row['ppl']:.3f} in {row['seconds']:.1f} s", file=sys.stderr, flush=True)
    return done


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("moe-prune", __doc__ or "")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    common.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 ...")
    common.add_argument(
        "--calibration-files", type=Path, nargs="+", help="UTF-8 text files (default: the corpus's validation split)"
    )
    common.add_argument("--calibration-tokens", type=int, default=262144, help="token budget of calibration text")
    common.add_argument(
        "--sample-tokens",
        type=int,
        default=16384,
        help="tokens per layer that get every expert applied (and are replayed)",
    )
    common.add_argument("--seq-len", type=int, default=512, help="window length (capped at the model's context)")
    common.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="calibrations and plans ($MOE_SERVE_CACHE)"
    )
    common.add_argument("--seed", type=int, default=0, help="for the random method")
    sub = parser.add_subparsers(dest="command", required=True)

    analyze = sub.add_parser(
        "analyze",
        parents=[common],
        formatter_class=HelpFormatter,
        help="per-layer PES, load balance, similar pairs, heatmap",
    )
    analyze.add_argument("model", type=Path, nargs="?", default=DEFAULT_MODEL_DIR, help="model directory")
    analyze.add_argument("-o", "--out", type=Path, default=Path("pruning-analysis"), help="output directory")
    analyze.set_defaults(run=cmd_analyze)

    plan = sub.add_parser(
        "plan",
        parents=[common],
        formatter_class=HelpFormatter,
        help="choose the experts to remove at a level; write a plan",
    )
    plan.add_argument("model", type=Path)
    plan.add_argument(
        "--prune-method", "--method", dest="method", choices=METHODS, default="pes", help="how experts are chosen"
    )
    plan.add_argument(
        "--prune-level", "--level", dest="level", type=float, required=True,
        help="fraction of routed experts removed, e.g. 0.25 (moe-serve's name; --level is the old spelling)",
    )  # fmt: skip
    plan.add_argument(
        "--prune-budget", "--budget", dest="budget", choices=BUDGETS, default="uniform",
        help="pes only: adaptive = per-layer counts by cost",
    )  # fmt: skip
    plan.add_argument(
        "--prune-handling", "--handling", dest="handling", choices=HANDLINGS, default="repick",
        help="where removed experts' tokens go",
    )  # fmt: skip
    plan.add_argument("-o", "--out", type=Path, required=True)
    plan.set_defaults(run=cmd_plan)

    apply = sub.add_parser(
        "apply", formatter_class=HelpFormatter, help="write the plan as a smaller Hugging Face checkpoint"
    )
    apply.add_argument("model", type=Path)
    apply.add_argument("plan", type=Path)
    apply.add_argument("-o", "--out", type=Path, required=True)
    apply.set_defaults(run=cmd_apply)

    placement = sub.add_parser(
        "place",
        parents=[common],
        formatter_class=HelpFormatter,
        help="place experts on expert-parallel ranks by measured load (for moe-serve --expert-placement)",
    )
    placement.add_argument("model", type=Path)
    placement.add_argument("--ranks", type=int, required=True, help="engine ranks (moe-serve --expert-parallel)")
    placement.add_argument(
        "--load", type=Path, help="a saved GET /v1/experts/load answer to place by (default: calibration counts)"
    )
    placement.add_argument("-o", "--out", type=Path, required=True)
    placement.set_defaults(run=cmd_place)

    evaluate = sub.add_parser(
        "eval",
        parents=[common],
        formatter_class=HelpFormatter,
        help="test perplexity per method and level; Table 6; Fig. 4",
    )
    evaluate.add_argument("models", type=Path, nargs="+")
    evaluate.add_argument(
        "--methods", default="pes,reap,frequency,random", help="comma-separated; pes+adaptive, pes+redirect ..."
    )
    evaluate.add_argument("--levels", default=DEFAULT_LEVELS, help="comma-separated pruning levels")
    evaluate.add_argument("--thresholds", default="0,0.1,0.15,0.2", help="routing thresholds tau ('' to skip)")
    evaluate.add_argument("--dropped-top", default="0,1,2,3", help="top experts masked per token ('' to skip)")
    evaluate.add_argument(
        "--test-tokens", type=int, default=None, help="score at most this many test tokens (default all)"
    )
    evaluate.add_argument("-o", "--out", type=Path, default=Path("pruning-eval"))
    evaluate.set_defaults(run=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with torch.no_grad():
            args.run(args)
    except (
        PlanError,
        CheckpointError,
        CorpusError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
        RuntimeError,
    ) as exc:
        print(f"moe-prune: error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
