"""How much a pruning method's cost moves with the calibration sample it was chosen on.

One plan per setting cannot rank close methods: which experts a plan removes, and so its perplexity off the
calibration distribution, swings with small changes in the calibration text. Here the calibration windows are
dealt (by a seeded permutation) into K disjoint folds; every method plans on every fold, and each plan is scored
on the test split and on each outside text set. A method's cost is then a mean and a standard deviation over
folds, and two methods compare by their paired (same fold) differences.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.model import MoEForCausalLM
from measures.perplexity import perplexity
from pruning.calibration import calibrate
from pruning.plan import PruningPlan, make_plan
from pruning.spec import PlanSpec


def calibration_folds(windows: torch.Tensor, folds: int, seed: int = 0) -> list[torch.Tensor]:
    """The windows dealt into `folds` disjoint, near-equal folds by a seeded permutation (each fold a mix of the
    whole split, so folds differ by sampling only)."""
    if not 2 <= folds <= len(windows):
        raise ValueError(f"need 2..{len(windows)} folds of {len(windows)} calibration windows, got {folds}")
    order = np.random.default_rng(seed).permutation(len(windows))
    return [windows[torch.from_numpy(np.sort(part))] for part in np.array_split(order, folds)]


@dataclass
class PlanScorer:
    """Perplexity of the model on each evaluation set with a plan's routing installed, remembered per plan
    (folds often agree on a plan, and scoring is the slow part)."""

    model: MoEForCausalLM
    sets: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        self.base = {name: perplexity(self.model, windows).ppl for name, windows in self.sets.items()}
        self.scored: dict[tuple[Any, ...], dict[str, float]] = {}

    def perplexities(self, plan: PruningPlan) -> dict[str, float]:
        """The pruned model's perplexity on each set."""
        key = tuple(
            (layer, tuple(kept), tuple(sorted(plan.redirect.get(layer, {}).items())))
            for layer, kept in sorted(plan.kept.items())
        )
        if key not in self.scored:
            self.model.set_routing_policies(plan.routing_policies())
            try:
                self.scored[key] = {name: perplexity(self.model, windows).ppl for name, windows in self.sets.items()}
            finally:
                self.model.set_routing_policies({})
        return self.scored[key]


def fold_study(
    model_dir: Path,
    model: MoEForCausalLM,
    folds: list[torch.Tensor],
    scorer: PlanScorer,
    specs: dict[str, PlanSpec],
    sample_tokens: int,
) -> list[dict[str, Any]]:
    """A row per fold and method (named as in `specs`): its plan's removed experts, and the pruned and unpruned
    perplexity on every evaluation set."""
    rows = []
    for index, fold in enumerate(folds):
        calibration = calibrate(model, fold[:, :-1], sample_tokens=sample_tokens)
        for name, spec in specs.items():
            plan = make_plan(model_dir, model, calibration, spec)
            row = {
                "model": model_dir.resolve().name, "method": name, "fold": index, "ppl": scorer.perplexities(plan),
                "base": scorer.base, "removed": {layer: sorted(set(range(plan.num_experts)) - set(kept))
                                                  for layer, kept in plan.kept.items()},
            }  # fmt: skip
            rows.append(row)
            costs = relative_costs(row)
            print(f"{row['model']} fold {index} {name}: " + ", ".join(f"{k} {v:+.1f}%" for k, v in costs.items()))
    return rows


def relative_costs(row: dict[str, Any]) -> dict[str, float]:
    """Per set, the pruned perplexity's increase over the unpruned one, in percent (sets differ tenfold in
    perplexity, so only relative costs compare across them)."""
    return {name: 100.0 * (ppl / row["base"][name] - 1.0) for name, ppl in row["ppl"].items()}


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and method: mean, sample standard deviation and per-fold values of each set's relative cost."""
    groups: dict[tuple[str, str], list[dict[str, float]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["method"]), []).append(relative_costs(row))
    out = []
    for (model, method), costs in groups.items():
        entry: dict[str, Any] = {"model": model, "method": method, "folds": len(costs)}
        for name in costs[0]:
            values = np.array([cost[name] for cost in costs])
            entry[name] = {
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                "values": values.tolist(),
            }
        out.append(entry)
    return out


def summary_markdown(summaries: list[dict[str, Any]]) -> str:
    """The summary as a table: relative cost, mean ± std over folds, per evaluation set."""
    sets = [key for key in summaries[0] if isinstance(summaries[0][key], dict)]
    head = "| model | method | folds | " + " | ".join(f"{name} cost" for name in sets) + " |\n"
    rule = "|---|---|---:|" + "---:|" * len(sets) + "\n"
    lines = [
        f"| {s['model']} | {s['method']} | {s['folds']} | "
        + " | ".join(f"{s[name]['mean']:+.1f}% ± {s[name]['std']:.1f}" for name in sets)
        + " |"
        for s in summaries
    ]
    return head + rule + "\n".join(lines) + "\n"
