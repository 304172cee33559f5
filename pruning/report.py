"""Tables (Markdown) and plots (PNG) of pruning analyses and evaluations; needs the `plots` extra (matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pruning.calibration import Calibration


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no screen), or an error naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install -e '.[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_figure(plt: Any, fig: Any, axes: list[Any], out: Path) -> Path:
    """Grid and legend on every axis, then save to out as PNG and free the figure."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def similarity_heatmap(calibration: Calibration, title: str, out: Path) -> Path:
    """One panel per MoE layer: the mean pairwise cosine of expert outputs (the PES map), diagonal blanked."""
    plt = pyplot()
    layers = calibration.layers
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols + 1.0, 3.0 * rows + 0.5), squeeze=False, layout="constrained"
    )
    maps = [np.where(np.eye(len(layer.similarity), dtype=bool), np.nan, layer.similarity) for layer in layers]
    bound = max(float(np.nanmax(np.abs(m))) for m in maps) or 1.0
    for ax, layer, values in zip(axes.flat, layers, maps):
        image = ax.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound)
        ax.set_title(f"layer {layer.layer}: PES {layer.pes:.3f}", fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("expert", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="mean cosine of outputs")
    fig.suptitle(title, fontsize=10)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def level_plot(results: dict[str, dict[str, Any]], out: Path) -> Path:
    """Test perplexity against pruning level: a panel per model, a curve per method variant."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.0), squeeze=False)
    for ax, (model, result) in zip(axes[0], results.items()):
        base = next(r["ppl"] for r in result["pruning"] if r["variant"] == "none")
        for variant in dict.fromkeys(r["variant"] for r in result["pruning"] if r["variant"] != "none"):
            rows = [r for r in result["pruning"] if r["variant"] == variant]
            ax.plot([0.0] + [r["level"] for r in rows], [base] + [r["ppl"] for r in rows], marker="o", label=variant)
        ax.set_title(f"{model} ({result['balancing']})")
        ax.set_xlabel("fraction of routed experts removed")
        ax.set_ylabel("test perplexity")
    return finish_figure(plt, fig, list(axes[0]), out)


def threshold_plot(results: dict[str, dict[str, Any]], out: Path) -> Path:
    """Table 6 as a picture: perplexity and scoring speed against the routing threshold tau, per model."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.4, 4.0))
    for model, result in results.items():
        rows = result["thresholds"]
        label = f"{model} ({result['balancing']})"
        left.plot([r["tau"] for r in rows], [r["ppl"] for r in rows], marker="o", label=label)
        right.plot([r["tau"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=label)
    left.set(xlabel="tau (routed experts below it are dropped)", ylabel="test perplexity")
    right.set(xlabel="tau", ylabel="scoring throughput, tokens/s")
    return finish_figure(plt, fig, [left, right], out)


def dropped_top_plot(results: dict[str, dict[str, Any]], out: Path) -> Path:
    """Fig. 4: test loss when each token's r most probable experts are masked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    for model, result in results.items():
        rows = result["dropped_top"]
        ax.plot(
            [r["dropped_top"] for r in rows],
            [r["loss"] for r in rows],
            marker="o",
            label=f"{model} ({result['balancing']})",
        )
    ax.set(xlabel="top experts masked per token", ylabel="test loss (nats)")
    return finish_figure(plt, fig, [ax], out)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def markdown(results: dict[str, dict[str, Any]]) -> str:
    """The evaluation as Markdown tables: perplexity per variant and level, the threshold sweep, dropped-top."""
    parts = []
    for model, result in results.items():
        rows = result["pruning"]
        levels = sorted({r["level"] for r in rows if r["variant"] != "none"})
        base = next(r["ppl"] for r in rows if r["variant"] == "none")
        table = []
        for variant in dict.fromkeys(r["variant"] for r in rows if r["variant"] != "none"):
            by_level = {r["level"]: r["ppl"] for r in rows if r["variant"] == variant}
            table.append([variant] + [f"{by_level[lv]:.3f} (+{100 * (by_level[lv] / base - 1):.1f}%)" for lv in levels])
        parts.append(f"### {model} ({result['balancing']}): test perplexity, unpruned {base:.3f}\n")
        parts.append(_table(["method"] + [f"{lv:g}" for lv in levels], table) + "\n")
        if result.get("thresholds"):
            parts.append(f"#### {model}: routing threshold (Table 6)\n")
            parts.append(
                _table(
                    ["tau", "ppl", "experts/token", "seconds", "tokens/s"],
                    [
                        [
                            f"{r['tau']:g}",
                            f"{r['ppl']:.3f}",
                            f"{r['experts_per_token']:.2f}",
                            f"{r['seconds']:.1f}",
                            f"{r['tokens_per_s']:.0f}",
                        ]
                        for r in result["thresholds"]
                    ],
                )
                + "\n"
            )
        if result.get("dropped_top"):
            parts.append(f"#### {model}: top experts masked per token (Fig. 4)\n")
            parts.append(
                _table(
                    ["masked", "loss", "ppl"],
                    [[str(r["dropped_top"]), f"{r['loss']:.4f}", f"{r['ppl']:.3f}"] for r in result["dropped_top"]],
                )
                + "\n"
            )
    return "\n".join(parts)


def fold_cost_plot(summaries: list[dict[str, Any]], out: Path) -> Path:
    """pruning.spread's summary as a picture: a panel per evaluation set, a bar per model and method at its mean
    relative cost with the standard deviation over folds, and each fold's cost as a dot."""
    plt = pyplot()
    sets = [key for key in summaries[0] if isinstance(summaries[0][key], dict)]
    models = list(dict.fromkeys(s["model"] for s in summaries))
    methods = list(dict.fromkeys(s["method"] for s in summaries))
    width = 0.8 / len(models)
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.8), squeeze=False)
    for ax, name in zip(axes[0], sets):
        for m, model in enumerate(models):
            entries = {s["method"]: s[name] for s in summaries if s["model"] == model}
            x = np.arange(len(methods)) + (m - (len(models) - 1) / 2) * width
            means = [entries[method]["mean"] if method in entries else np.nan for method in methods]
            stds = [entries[method]["std"] if method in entries else 0.0 for method in methods]
            ax.bar(x, means, width * 0.9, yerr=stds, capsize=3, alpha=0.6, label=model)
            for xi, method in zip(x, methods):
                if method in entries:
                    values = entries[method]["values"]
                    ax.plot([xi] * len(values), values, "k.", markersize=3)
        ax.set_xticks(np.arange(len(methods)), methods)
        ax.set_title(f"{name}: cost over folds", fontsize=10)
        ax.set_ylabel("perplexity increase (%)")
    return finish_figure(plt, fig, list(axes[0]), out)
