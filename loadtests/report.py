"""The sweep's table (CSV, JSON, Markdown) and its plot: output throughput against perplexity, a curve per model and
method, a point per level."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from pruning.report import finish_figure, pyplot

COLUMNS = (
    "model", "balancing", "method", "level", "route_threshold", "users", "requests", "failures", "duration_s",
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


def markdown(rows: list[dict[str, Any]]) -> str:
    header = (
        "| model | balancing | method | level | tau | users | req/s | out tok/s | TTFT p50/p99 ms | ITL p50/p99 ms "
        "| peak MiB | ppl |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['model']} | {r['balancing']} | {r['method']} | {r['level']:g} | {r['route_threshold']:g} | {r['users']} "
        f"| {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} "
        f"| {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {r['peak_memory_mib']:.0f} | {r['perplexity']:.2f} |"
        for r in rows
    ]
    return header + "\n".join(lines) + "\n"


def throughput_plot(rows: list[dict[str, Any]], out: Path) -> Path:
    """Output tokens/s against perplexity: a panel per user count, a curve per model and method, a point per
    level (or routing threshold), labelled with it."""
    plt = pyplot()
    user_counts = sorted({r["users"] for r in rows})
    fig, axes = plt.subplots(1, len(user_counts), figsize=(5.6 * len(user_counts), 4.4), squeeze=False)
    for ax, users in zip(axes[0], user_counts):
        at_users = [r for r in rows if r["users"] == users]
        baselines = {r["model"]: r for r in at_users if r["method"] == "none"}
        curves = dict.fromkeys((r["model"], r["method"]) for r in at_users if r["method"] != "none")
        if not curves:  # only unpruned runs: one point per model
            curves = dict.fromkeys((model, "none") for model in baselines)
        for model, method in curves:
            points = [r for r in at_users if (r["model"], r["method"]) == (model, method) and method != "none"]
            points.sort(key=lambda r: r["route_threshold"] or r["level"])
            if model in baselines:
                points.insert(0, baselines[model])
            line = ax.plot(
                [r["perplexity"] for r in points],
                [r["output_tokens_per_s"] for r in points],
                marker="o",
                label=f"{model} ({points[0]['balancing']}) {method}",
            )[0]
            for r in points:
                text = f"tau {r['route_threshold']:g}" if r["route_threshold"] else f"{r['level']:g}"
                ax.annotate(text, (r["perplexity"], r["output_tokens_per_s"]), fontsize=7, color=line.get_color(),
                            xytext=(3, 3), textcoords="offset points")  # fmt: skip
        ax.set_title(f"{users} concurrent users")
        ax.set_xlabel("test perplexity (through the server)")
        ax.set_ylabel("output tokens/s")
    return finish_figure(plt, fig, list(axes[0]), out)
