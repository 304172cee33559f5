"""Decode steps against their memory floor as a PNG, from engine.bench runs' --json files.

`python -m engine.floor_plot OUT.png RUN.json [RUN.json ...]`: one group of bars per batch size, a bar per run
(labelled by its dtype and threads) at the step's fraction of the copy floor, a whisker to its fraction of the
reads-alone floor (the two bandwidths drift apart on a VM, so the floor is a range), and the targets' lines: 2x
of the floor (50%) at batch 8 and 32, 3x (33%) at batch 1.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def label(run: dict[str, Any]) -> str:
    """What tells the runs apart: dtype, threads, and the mode when eager."""
    mode = "" if run["mode"] == "compiled" else f", {run['mode']}"
    return f"{run['dtype']}, {run['threads']} thread{'s' if run['threads'] > 1 else ''}{mode}"


def plot(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """Grouped bars of each run's fraction of its copy floor per batch size, whiskers to the read floor's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({row["batch"] for run in runs for row in run["decode"]})
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, run in enumerate(runs):
        rows = {row["batch"]: row for row in run["decode"]}
        at = [j for j, batch in enumerate(batches) if batch in rows]
        copy = [100 * rows[batches[j]]["fraction_of_floor"] for j in at]
        read = [100 * rows[batches[j]].get("fraction_of_read_floor", rows[batches[j]]["fraction_of_floor"]) for j in at]
        spread = [[max(c - r, 0) for c, r in zip(copy, read)], [max(r - c, 0) for c, r in zip(copy, read)]]
        positions = [j + (i - (len(runs) - 1) / 2) * width for j in at]
        ax.bar(positions, copy, width, yerr=spread, capsize=3, label=label(run))
    ax.axhline(50, color="black", linewidth=1, linestyle="--", label="2x of the floor")
    ax.axhline(100 / 3, color="gray", linewidth=1, linestyle=":", label="3x (batch 1)")
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("% of the memory floor (copy; whisker: reads alone)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.floor_plot", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("runs", type=Path, nargs="+", help="engine.bench --json files")
    parser.add_argument("--title", default="decode step against its memory floor")
    args = parser.parse_args(argv)
    runs = []
    for path in args.runs:
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            parser.error(f"{path}: {error}")
        if not isinstance(run, dict) or not run.get("decode"):
            parser.error(f"{path}: no decode rows (not an engine.bench --json file, or a --breakdown one)")
        runs.append(run)
    plot(runs, args.out, args.title)
    print(args.out)


if __name__ == "__main__":
    main()
