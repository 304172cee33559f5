"""Throughput against perplexity at decode time, per routing setting: batch-aware substitution, per-token
thresholds and budgets, and static pruning, measured side by side on one model.

`python -m pruning.frontier MODEL [--batch-sizes 8,32] [--rounds 3] [--static reap,frequency,pes]`
`[--levels 0.25] [--json PATH] [--plot PNG]`; `--from-json PATH --plot PNG` redraws a run.

Substitution depends on a token's batch-mates, and it touches generated tokens only, so its cost cannot be read
from a prompt-scoring pass. Here every sequence is teacher-forced (SamplingParams.forced_tokens): B windows of
the test split decode together, each prompted with its first --prompt-len tokens and forced through its next
--forced-len, and the forced tokens' logprobs (after the first, which the prefill computes) give the decode-time
perplexity of exactly the batches whose decode tokens/s is timed. Per-token settings (substitution, threshold,
experts per token) run on one engine holding the similarity maps, as a server does (no recompilation between
them); each static plan gets its own engine. Settings alternate within each of --rounds rounds; the table
gives the median tokens/s with its range, the perplexity, and the experts a decode step read per layer.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch._dynamo

from engine.bench import expected_experts, progress
from engine.checkpoint import load_model
from engine.config import ModelConfig
from engine.decoding import start_decoding
from engine.llm import LLM
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.token_routing import TokenRouting
from pruning.cache import cached_plan
from pruning.data import split_windows
from pruning.serving import resolve
from pruning.settings import PruningSettings
from pruning.spec import CalibrationSpec, PlanSpec


@dataclass(frozen=True)
class Setting:
    """One routing setting: the engine it runs on ("" for the shared one, else a static plan) and the budget
    every request carries."""

    name: str
    family: str  # what the plot groups by
    routing: TokenRouting = field(default_factory=TokenRouting)
    plan: tuple[str, float] | None = None  # (method, level) of a static plan


def per_token_settings(
    top_k: int, keep_tops: list[int], similarities: list[float], thresholds: list[float], experts: list[int] | None
) -> list[Setting]:
    settings = [Setting("none", "none")]
    for keep in keep_tops:
        for rho in similarities:
            routing = TokenRouting(keep_top=keep, min_similarity=rho)
            settings.append(Setting(f"substitute keep {keep}, sim >= {rho:g}", f"substitution, keep {keep}", routing))
    settings += [Setting(f"threshold {tau:g}", "threshold", TokenRouting(min_prob=tau)) for tau in thresholds]
    settings += [
        Setting(f"{k} experts/token", "experts per token", TokenRouting(experts_per_token=k))
        for k in (range(1, top_k) if experts is None else experts)
        if k < top_k
    ]
    return settings


def measure(
    llm: LLM, setting: Setting, windows: torch.Tensor, batch: int, prompt_len: int, score: bool
) -> dict[str, float]:
    """Decode B windows at a time under the setting: decode tokens/s, experts read per step, and with `score`
    the forced tokens' NLL (logprobs cost host work per token, so timed passes do not ask for them)."""
    engine = llm.engine
    forced_len = windows.shape[1] - prompt_len
    nll, tokens, seconds, decoded = 0.0, 0, 0.0, 0
    moe_layers = engine.model.config.moe_layers
    read = np.zeros((len(moe_layers), engine.model.config.num_experts + 1), dtype=np.int64)
    for start in range(0, len(windows) - batch + 1, batch):
        rows = windows[start : start + batch].tolist()
        params = [
            SamplingParams(
                max_tokens=forced_len, forced_tokens=row[prompt_len:], logprobs=0 if score else None, ignore_eos=True,
                temperature=0.0, routing=setting.routing,
            )
            for row in rows
        ]  # fmt: skip
        ids = start_decoding(engine, f"frontier-{start}", [row[:prompt_len] for row in rows], params)
        read_before = engine.experts_read()[moe_layers]
        finished: dict[str, RequestOutput] = {}
        begin = time.perf_counter()
        while engine.has_unfinished_requests():
            finished.update((o.request_id, o) for o in engine.step() if o.finished)
        seconds += time.perf_counter() - begin
        read = read + engine.experts_read()[moe_layers] - read_before
        decoded += batch * (forced_len - 1)
        for request_id, row in zip(ids, rows, strict=True) if score else ():
            entries = finished[request_id].outputs[0].logprobs or []
            for entry, token in zip(entries[1:], row[prompt_len + 1 :], strict=True):
                nll -= entry[token].logprob
                tokens += 1
    experts = np.arange(read.shape[1])
    mean_read = float((read * experts).sum() / max(read.sum(), 1))
    return {"tok_s": decoded / seconds, "nll": nll / max(tokens, 1), "tokens": tokens, "experts_read": mean_read}


def build_engines(model_dir: Path, settings: list[Setting], args: argparse.Namespace) -> dict[Any, LLM]:
    """The shared engine (with similarity maps) and one per static plan."""
    common = {"dtype": args.dtype, "max_num_seqs": max(args.batch_sizes), "kv_cache_memory_bytes": args.kv_bytes,
              "enable_prefix_caching": False}  # fmt: skip
    spec = CalibrationSpec(max_tokens=args.calibration_tokens, sample_tokens=args.sample_tokens)
    policies, _ = resolve(PruningSettings(similarity_maps=True), model_dir, "cpu", args.dtype, spec=spec)
    progress("compiling the shared engine")
    engines: dict[Any, LLM] = {None: LLM(model_dir, routing_policies=policies, **common)}
    static = any(setting.plan is not None for setting in settings)
    model = load_model(model_dir, torch.float32, torch.device("cpu")).eval() if static else None
    for setting in settings:
        if setting.plan is not None and setting.plan not in engines:
            assert model is not None
            plan = cached_plan(model_dir, model, PlanSpec(*setting.plan, calibration=spec))
            progress(f"compiling the engine of {setting.name}")
            engines[setting.plan] = LLM(model_dir, routing_policies=plan.routing_policies(), **common)
    return engines


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # one graph pair per engine; several engines share the functions
    top_k = ModelConfig.from_dir(args.model).top_k
    settings = per_token_settings(top_k, args.keep_top, args.min_similarity, args.thresholds, args.experts_per_token)
    settings += [
        Setting(f"{method} {level:g}", f"static {method}", plan=(method, level))
        for method in args.static
        for level in args.levels
    ]
    engines = build_engines(args.model, settings, args)
    windows = split_windows(args.model, "test", args.prompt_len + args.forced_len - 1, args.max_tokens)
    samples: dict[str, dict[int, list[dict[str, float]]]] = {
        s.name: {b: [] for b in args.batch_sizes} for s in settings
    }
    scores: dict[str, dict[int, float]] = {s.name: {} for s in settings}
    for batch in args.batch_sizes:
        for setting in settings:
            progress(f"perplexity, batch {batch}: {setting.name}")
            scored = measure(engines[setting.plan], setting, windows, batch, args.prompt_len, score=True)
            scores[setting.name][batch] = scored["nll"]
    for round_ in range(args.rounds):
        for batch in args.batch_sizes:
            for setting in settings:
                progress(f"round {round_ + 1}/{args.rounds}, batch {batch}: {setting.name}")
                timed = measure(engines[setting.plan], setting, windows, batch, args.prompt_len, score=False)
                samples[setting.name][batch].append({**timed, "nll": scores[setting.name][batch]})
    config = engines[None].engine.model.config
    return {
        "model": str(args.model),
        "dtype": str(engines[None].engine.dtype).removeprefix("torch."),
        "threads": args.threads,
        "prompt_len": args.prompt_len,
        "forced_len": args.forced_len,
        "windows": len(windows),
        "expected_experts": {b: expected_experts(config.num_experts, config.top_k, b) for b in args.batch_sizes},
        "settings": [{"name": s.name, "family": s.family} for s in settings],
        "samples": samples,
    }


def summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per setting and batch size: median tok/s and range, ratio to none, perplexity and its change."""
    rows = []
    for batch in sorted({int(b) for s in result["samples"].values() for b in s}):
        base = result["samples"]["none"]
        base_tok = statistics.median(m["tok_s"] for m in _at(base, batch))
        base_ppl = math.exp(statistics.median(m["nll"] for m in _at(base, batch)))
        for setting in result["settings"]:
            runs = _at(result["samples"][setting["name"]], batch)
            tok = [m["tok_s"] for m in runs]
            ppl = math.exp(statistics.median(m["nll"] for m in runs))
            rows.append({
                "batch": batch, "setting": setting["name"], "family": setting["family"],
                "tok_s": statistics.median(tok), "tok_s_min": min(tok), "tok_s_max": max(tok),
                "speedup": statistics.median(tok) / base_tok, "ppl": ppl, "ppl_change": ppl / base_ppl - 1,
                "experts_read": statistics.median(m["experts_read"] for m in runs),
            })  # fmt: skip
    return rows


def _at(samples: dict[Any, list[dict[str, float]]], batch: int) -> list[dict[str, float]]:
    return samples.get(batch, samples.get(str(batch), []))


def markdown(result: dict[str, Any]) -> str:
    rounds = len(next(iter(result["samples"]["none"].values())))
    header = (
        f"model {result['model']}, {result['dtype']}, {result['threads']} threads; windows of {result['prompt_len']} "
        f"prompt + {result['forced_len']} forced tokens; medians of {rounds} rounds"
    )
    lines = [
        header,
        "",
        "| batch | setting | decode tok/s (range) | vs none | perplexity | change | experts read / layer / step |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in summary(result):
        lines.append(
            f"| {row['batch']} | {row['setting']} | {row['tok_s']:.0f} ({row['tok_s_min']:.0f}-{row['tok_s_max']:.0f}) "
            f"| {row['speedup']:.2f}x | {row['ppl']:.2f} | {row['ppl_change']:+.1%} | {row['experts_read']:.1f} |"
        )
    expected = ", ".join(f"B={b}: {u:.1f}" for b, u in result["expected_experts"].items())
    lines += ["", f"U(B) for uniformly routed tokens: {expected}."]
    return "\n".join(lines)


def plot(result: dict[str, Any], out: Path, max_change: float = 0.4, against: str = "perplexity") -> Path:
    """Per batch size, one line per family. Against perplexity (settings up to max_change): decode tokens/s
    (median, whiskers min-max over rounds) above, experts a decode step read per layer below. Against experts
    (for models whose perplexity means nothing, such as random ones): decode tokens/s by experts read."""
    from pruning.report import finish_figure, pyplot

    plt = pyplot()
    by_ppl = against == "perplexity"
    rows = [row for row in summary(result) if row["ppl_change"] <= max_change or not by_ppl]
    batches = sorted({row["batch"] for row in rows})
    grid = 2 if by_ppl else 1
    fig, axes = plt.subplots(grid, len(batches), figsize=(6 * len(batches), 4 * grid), squeeze=False, sharex="col")
    for column, batch in enumerate(batches):
        top = axes[0][column]
        for family in dict.fromkeys(row["family"] for row in rows):
            key = (lambda r: r["ppl_change"]) if by_ppl else (lambda r: r["experts_read"])
            points = sorted((r for r in rows if r["batch"] == batch and r["family"] == family), key=key)
            x = [100 * r["ppl_change"] if by_ppl else r["experts_read"] for r in points]
            spread = [[r["tok_s"] - r["tok_s_min"] for r in points], [r["tok_s_max"] - r["tok_s"] for r in points]]
            top.errorbar(x, [r["tok_s"] for r in points], yerr=spread, marker="o", capsize=3, label=family)
            if by_ppl:
                axes[1][column].plot(x, [r["experts_read"] for r in points], marker="o", label=family)
        top.set_title(f"batch {batch}")
        top.set_ylabel("decode tokens/s")
        if by_ppl:
            axes[1][column].set_ylabel("experts read per layer per decode step")
            axes[1][column].set_xlabel(f"decode-time perplexity change (%), settings up to +{100 * max_change:g}%")
            for ax in (top, axes[1][column]):
                ax.axvline(3.0, color="grey", linestyle=":", linewidth=1)
        else:
            top.set_xlabel("experts read per layer per decode step")
    axes[0][-1].legend(fontsize=7)
    return finish_figure(plt, fig, [ax for row in axes for ax in row], out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pruning.frontier", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    floats = lambda text: [float(v) for v in text.split(",") if v]
    ints = lambda text: [int(v) for v in text.split(",") if v]
    parser.add_argument("--batch-sizes", type=ints, default=[8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep-top", type=ints, default=[1, 2])
    parser.add_argument("--min-similarity", type=floats, default=[0.0, 0.3, 0.6])
    parser.add_argument("--thresholds", type=floats, default=[0.1, 0.2])
    parser.add_argument("--experts-per-token", type=ints, help="budgets below top-k (default: every one)")
    parser.add_argument("--static", type=lambda t: [m for m in t.split(",") if m], default=["reap", "frequency", "pes"])
    parser.add_argument("--levels", type=floats, default=[0.25])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--forced-len", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=128 * 64, help="test-split tokens to draw windows from")
    parser.add_argument("--calibration-tokens", type=int, default=CalibrationSpec.max_tokens)
    parser.add_argument("--sample-tokens", type=int, default=CalibrationSpec.sample_tokens)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv-bytes", type=int, default=256 << 20)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument(
        "--plot-against", choices=["perplexity", "experts"], default="perplexity",
        help="the plot's x axis (experts read: for models whose perplexity means nothing, such as random ones)",
    )  # fmt: skip
    parser.add_argument("--from-json", type=Path, help="print and plot an earlier run's --json; run nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = json.loads(args.from_json.read_text()) if args.from_json else run(args)
    print(markdown(result))
    if args.json and not args.from_json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot, against=args.plot_against)


if __name__ == "__main__":
    main()
