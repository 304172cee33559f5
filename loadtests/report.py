"""The sweep's tables (CSV and JSON of every run, Markdown of the medians over rounds) and its plot: output
throughput against perplexity, a point per model and setting with its spread over rounds."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from pruning.report import finish_figure, pyplot

COLUMNS = (
    "model", "balancing", "setting", "method", "level", "route_threshold", "keep_top", "min_similarity", "round",
    "users", "requests", "failures", "duration_s",
    "requests_per_s", "input_tokens_per_s", "output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
    "itl_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "peak_memory_mib", "weight_mib",
    "perplexity", "ppl_tokens",
)  # fmt: skip


def write_tables(rows: list[dict[str, Any]], settings: dict[str, Any], out: Path) -> list[Path]:
    """results.csv and results.md (the table), results.json (the table and the sweep's settings)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows({column: row[column] for column in COLUMNS} for row in rows)
    table = {"settings": settings, "rows": [{k: _null_if_nan(v) for k, v in row.items()} for row in rows]}
    (out / "results.json").write_text(json.dumps(table, indent=2, allow_nan=False) + "\n")
    (out / "results.md").write_text(markdown(rows))
    return [out / "results.csv", out / "results.md", out / "results.json"]


def _null_if_nan(value: Any) -> Any:
    """JSON has no NaN (a percentile of no values): null instead."""
    return None if isinstance(value, float) and math.isnan(value) else value


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model, setting and user count: throughput's median and range over the rounds (interleaved
    repeats; a sweep without rounds has one), the failures summed, the setting's perplexity."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["setting"], row["users"]), []).append(row)
    summarized = []
    for (model, setting, users), runs in groups.items():
        tokens = [r["output_tokens_per_s"] for r in runs]
        summarized.append({
            "model": model, "balancing": runs[0]["balancing"], "setting": setting, "users": users,
            "rounds": len(runs), "output_tokens_per_s": statistics.median(tokens), "tokens_min": min(tokens),
            "tokens_max": max(tokens), "requests_per_s": statistics.median(r["requests_per_s"] for r in runs),
            "ttft_p50_ms": statistics.median(r["ttft_p50_ms"] for r in runs),
            "itl_p50_ms": statistics.median(r["itl_p50_ms"] for r in runs),
            "failures": sum(r["failures"] for r in runs), "perplexity": runs[0]["perplexity"],
            "peak_memory_mib": max(r["peak_memory_mib"] for r in runs),
        })  # fmt: skip
    return summarized


def markdown(rows: list[dict[str, Any]]) -> str:
    """The summary as a table: medians over rounds, with the range and the ratio to the unpruned setting."""
    header = (
        "| model | balancing | setting | users | rounds | out tok/s median (range) | vs none | req/s | TTFT p50 ms "
        "| ITL p50 ms | failed | peak MiB | ppl |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    summarized = summary(rows)
    base = {(r["model"], r["users"]): r["output_tokens_per_s"] for r in summarized if r["setting"] == "none"}
    lines = []
    for r in summarized:
        ratio = (
            r["output_tokens_per_s"] / base[(r["model"], r["users"])] if (r["model"], r["users"]) in base else math.nan
        )
        lines.append(
            f"| {r['model']} | {r['balancing']} | {r['setting']} | {r['users']} | {r['rounds']} "
            f"| {r['output_tokens_per_s']:.1f} ({r['tokens_min']:.1f}-{r['tokens_max']:.1f}) | {ratio:.2f}x "
            f"| {r['requests_per_s']:.2f} | {r['ttft_p50_ms']:.0f} | {r['itl_p50_ms']:.1f} | {r['failures']} "
            f"| {r['peak_memory_mib']:.0f} | {r['perplexity']:.3f} |"
        )
    return header + "\n".join(lines) + "\n"


def throughput_plot(rows: list[dict[str, Any]], out: Path) -> Path:
    """Output tokens/s against perplexity, a panel per user count: a point per model and setting at its median
    over the rounds, a bar over their range, the setting's name beside it; points are not joined (settings have
    no order), and the throughput axis starts at zero."""
    plt = pyplot()
    summarized = summary(rows)
    user_counts = sorted({r["users"] for r in summarized})
    fig, axes = plt.subplots(1, len(user_counts), figsize=(5.8 * len(user_counts), 4.8), squeeze=False)
    rounds = max(r["rounds"] for r in summarized)
    for ax, users in zip(axes[0], user_counts):
        for model in dict.fromkeys(r["model"] for r in summarized):
            points = [r for r in summarized if r["model"] == model and r["users"] == users]
            median = [r["output_tokens_per_s"] for r in points]
            spread = [
                [m - r["tokens_min"] for m, r in zip(median, points)],
                [r["tokens_max"] - m for m, r in zip(median, points)],
            ]
            bars = ax.errorbar([r["perplexity"] for r in points], median, yerr=spread, fmt="o", capsize=3,
                               label=f"{model} ({points[0]['balancing']})")  # fmt: skip
            for r in points:
                ax.annotate(r["setting"], (r["perplexity"], r["output_tokens_per_s"]), fontsize=7,
                            color=bars[0].get_color(), xytext=(4, 3), textcoords="offset points")  # fmt: skip
        ax.set_ylim(bottom=0)
        ax.set_title(f"{users} concurrent user{'' if users == 1 else 's'}")
        ax.set_xlabel("test perplexity, measured through the server")
        ax.set_ylabel(f"output tokens/s (median of {rounds} round{'' if rounds == 1 else 's'}; bar: range)")
    fig.text(0.01, 0.005, "none: unpruned; method-L: static pruning of share L; tauT: routing threshold T; "
             "subK@R: substitution keeping K slots, similarity >= R", fontsize=7)  # fmt: skip
    return finish_figure(plt, fig, list(axes[0]), out)
