"""How much a pruning method's cost moves with the calibration sample it was chosen on.

One plan per setting cannot rank close methods: which experts a plan removes, and so its perplexity off the
calibration distribution, swings with small changes in the calibration text. Here the calibration windows are
dealt (by a seeded permutation) into K disjoint folds; every method plans on every fold, and each plan is scored
on the test split and on each outside text set. A method's cost is then a mean and a standard deviation over
folds, and two methods compare by their paired (same fold) differences.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.model import MoEForCausalLM
from engine.routing import RoutingPolicy
from measures.perplexity import perplexity
from pruning.calibration import calibrate
from pruning.plan import PruningPlan, make_plan
from pruning.spec import PlanSpec


def scored(model: MoEForCausalLM, windows: torch.Tensor, policies: dict[int, RoutingPolicy]) -> float:
    """Perplexity of the windows with the policies installed (removed afterwards)."""
    model.set_routing_policies(policies)
    try:
        return perplexity(model, windows).ppl
    finally:
        model.set_routing_policies({})


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
            policies = plan.routing_policies()
            self.scored[key] = {name: scored(self.model, windows, policies) for name, windows in self.sets.items()}
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
                "base": scorer.base, "removed": plan.removed(),
            }  # fmt: skip
            rows.append(row)
            costs = relative_costs(row)
            print(f"{row['model']} fold {index} {name}: " + ", ".join(f"{k} {v:+.1f}%" for k, v in costs.items()))
    return rows


def relative_costs(row: dict[str, Any]) -> dict[str, float]:
    """Per set, the pruned perplexity's increase over the unpruned one, in percent (sets differ many-fold in
    perplexity, so only relative costs compare across them)."""
    return {name: 100.0 * (ppl / row["base"][name] - 1.0) for name, ppl in row["ppl"].items()}


def plan_overlap(rows: list[dict[str, Any]]) -> float:
    """How alike the folds' plans are: the mean over pairs of folds of the Jaccard overlap of their removed
    (layer, expert) sets (1: every fold removes the same experts)."""
    removed = [{(layer, e) for layer, experts in row["removed"].items() for e in experts} for row in rows]
    pairs = list(itertools.combinations(removed, 2))
    return float(np.mean([len(a & b) / len(a | b) if a | b else 1.0 for a, b in pairs])) if pairs else 1.0


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda row: row["fold"]):
        groups.setdefault((row["model"], row["method"]), []).append(row)
    return groups


def _spread(values: np.ndarray) -> dict[str, Any]:
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "se": std / len(values) ** 0.5, "values": values.tolist()}


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and method: each set's relative cost over folds (mean, sample standard deviation, standard
    error, per-fold values), and how alike the folds' plans are."""
    out = []
    for (model, method), group in _groups(rows).items():
        costs = [relative_costs(row) for row in group]
        entry: dict[str, Any] = {"model": model, "method": method, "folds": len(group), "overlap": plan_overlap(group)}
        entry |= {name: _spread(np.array([cost[name] for cost in costs])) for name in costs[0]}
        out.append(entry)
    return out


def differences(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model, each method's relative cost minus the first method's, fold by fold (both planned on the same
    fold), over folds: the comparison the calibration sample's noise affects least."""
    groups = _groups(rows)
    out = []
    for model in dict.fromkeys(model for model, _ in groups):
        methods = [method for m, method in groups if m == model]
        reference = [relative_costs(row) for row in groups[(model, methods[0])]]
        for method in methods[1:]:
            costs = [relative_costs(row) for row in groups[(model, method)]]
            entry: dict[str, Any] = {"model": model, "method": method, "reference": methods[0]}
            entry |= {
                name: _spread(np.array([c[name] - r[name] for c, r in zip(costs, reference, strict=True)]))
                for name in reference[0]
            }
            out.append(entry)
    return out


def _sets(entries: list[dict[str, Any]]) -> list[str]:
    return [key for key in entries[0] if isinstance(entries[0][key], dict)]


def summary_markdown(summaries: list[dict[str, Any]]) -> str:
    """The summary as a table: relative cost, mean ± std over folds, per evaluation set, and the plans' overlap."""
    sets = _sets(summaries)
    head = "| model | method | folds | " + " | ".join(f"{name} cost" for name in sets) + " | plan overlap |\n"
    rule = "|---|---|---:|" + "---:|" * (len(sets) + 1) + "\n"
    lines = [
        f"| {s['model']} | {s['method']} | {s['folds']} | "
        + " | ".join(f"{s[name]['mean']:+.1f}% ± {s[name]['std']:.1f}" for name in sets)
        + f" | {s['overlap']:.2f} |"
        for s in summaries
    ]
    return head + rule + "\n".join(lines) + "\n"


def differences_markdown(entries: list[dict[str, Any]]) -> str:
    """The paired differences as a table: points of relative cost, mean ± standard error over folds."""
    if not entries:
        return ""
    sets = _sets(entries)
    head = "| model | difference | " + " | ".join(sets) + " |\n" + "|---|---|" + "---:|" * len(sets) + "\n"
    lines = [
        f"| {e['model']} | {e['method']} - {e['reference']} | "
        + " | ".join(f"{e[name]['mean']:+.1f} ± {e[name]['se']:.1f}" for name in sets)
        + " |"
        for e in entries
    ]
    return head + "\n".join(lines) + "\n"
