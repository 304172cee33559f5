"""The replication report: SimBal, LBL and no balancing trained at the same budget, compared with the paper.

    python -m training.report simbal=models/tiny-simbal lbl=models/tiny-lbl none=runs/tiny-none --out docs/replication

Reads each run's metrics.jsonl and writes summary.json plus PNG plots: validation loss, experts in use,
load imbalance, min PES and router orthogonality over training tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

COLORS = {"simbal": "tab:blue", "lbl": "tab:orange", "none": "tab:gray"}


def read_evals(run_dir: Path) -> list[dict[str, Any]]:
    """The evaluation records of a run, in step order, each with its token count."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # "tokens" is the training tokens so far (the eval record's own "tokens" counts the tokens it scored).
    return [{**r["eval"], "step": r["step"], "tokens": r["tokens"]} for r in records if "eval" in r]


def tokens_to_reach(evals: list[dict[str, Any]], target_loss: float) -> float | None:
    """Training tokens at which validation loss first falls to target_loss (linear between evaluations)."""
    previous = None
    for record in evals:
        if record["loss"] <= target_loss:
            if previous is None:
                return float(record["tokens"])
            t0, l0, t1, l1 = previous["tokens"], previous["loss"], record["tokens"], record["loss"]
            return t0 + (t1 - t0) * (l0 - target_loss) / (l0 - l1)
        previous = record
    return None


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Final measures per run, and how much of LBL's budget SimBal needs to reach LBL's final loss."""
    summary: dict[str, Any] = {}
    for name, evals in runs.items():
        last = evals[-1]
        summary[name] = {
            "final_val_loss": last["loss"],
            "final_val_ppl": last["ppl"],
            "tokens": last["tokens"],
            "min_experts_in_use": min(min(e["experts_in_use"]) for e in evals),
            "final_experts_in_use": last["experts_in_use"],
            "final_imbalance": last["imbalance"],
            "final_min_pes": last["min_pes"],
            "final_pes": last["pes"],
            "final_router_orthogonality": sum(last["router_orthogonality"]) / len(last["router_orthogonality"]),
        }
    if "simbal" in runs and "lbl" in runs:
        # The paper's convergence claim both ways round: None where a run never reaches the other's final loss.
        for fast, slow in (("simbal", "lbl"), ("lbl", "simbal")):
            reached = tokens_to_reach(runs[fast], runs[slow][-1]["loss"])
            key = f"{fast}_fraction_of_{slow}_tokens_to_reach_{slow}_final_loss"
            summary[key] = None if reached is None else reached / runs[slow][-1]["tokens"]
    return summary


def plot(runs: dict[str, list[dict[str, Any]]], out: Path) -> list[Path]:
    """One PNG per measure, the runs overlaid; per-layer measures drawn as the mean with a min-max band."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    panels = [
        ("val_loss", "validation loss", lambda e: (e["loss"], e["loss"], e["loss"]), False),
        ("experts_in_use", "experts receiving tokens (per layer)", lambda e: _spread(e["experts_in_use"]), False),
        ("imbalance", "load imbalance max/mean (per layer)", lambda e: _spread(e["imbalance"]), True),
        (
            "min_pes",
            "PES (per layer; line = min over layers)",
            lambda e: (min(e["pes"]), min(e["pes"]), max(e["pes"])),
            False,
        ),
        (
            "orthogonality",
            "router orthogonality, mean (W W^T - I)^2",
            lambda e: _spread(e["router_orthogonality"]),
            True,
        ),
    ]
    for name, label, measure, log in panels:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for run, evals in runs.items():
            tokens = [e["tokens"] / 1e6 for e in evals]
            values = [measure(e) for e in evals]
            color = COLORS.get(run)
            ax.plot(tokens, [v[0] for v in values], label=run, color=color)
            ax.fill_between(tokens, [v[1] for v in values], [v[2] for v in values], alpha=0.15, color=color)
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
            if name == "imbalance":
                ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
                ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                ax.set_yticks([1, 1.5, 2, 3, 4, 6])
        if name == "val_loss":
            ax.set_ylim(top=min(max(e["loss"] for ev in runs.values() for e in ev[1:]) + 0.2, 8))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def _spread(values: list[float]) -> tuple[float, float, float]:
    return sum(values) / len(values), min(values), max(values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR, e.g. simbal=models/tiny-simbal")
    parser.add_argument("--out", type=Path, default=Path("docs/replication"))
    args = parser.parse_args(argv)
    runs = {}
    for item in args.runs:
        name, _, path = item.partition("=")
        if not path:
            parser.error(f"expected NAME=RUN_DIR, got {item!r}")
        runs[name] = read_evals(Path(path))
    args.out.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for path in plot(runs, args.out):
        print(path)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
