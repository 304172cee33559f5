"""The `pes` method: remove the experts whose work the survivors already do, measured on calibration tokens.

For each sampled token the layer's router and EVERY expert are replayed from the calibration inputs, so the
layer's output can be recomputed exactly for any set of removed experts. Experts are removed greedily: at each
step, the one whose removal changes the layer's output least, given those already removed. An expert scores low
when it contributes little (rarely routed, small gate, small output) or is redundant (the expert that takes its
tokens, or the survivor its slot is redirected to, computes nearly the same function); the error measures both
at once. The cost is the relative squared error of the MoE output, so costs compare across layers and drive a
per-layer budget.

Tokens of a removed expert either re-pick top-k among the survivors ("repick"), or keep the slot and its weight
and are served by the survivor most similar to it in the PES similarity map ("redirect").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.moe import SparseMoE
from engine.routing import RoutingPolicy, route
from pruning.choices import HANDLINGS


@dataclass(frozen=True)
class LayerReplay:
    """A layer's router logits [T, E] and every expert's output [E, T, H] on the calibration tokens."""

    logits: torch.Tensor
    outputs: torch.Tensor
    top_k: int
    norm_topk_prob: bool
    router_scoring: str = "softmax"

    @classmethod
    @torch.no_grad()
    def of(cls, block: SparseMoE, inputs: np.ndarray) -> LayerReplay:
        x = torch.from_numpy(inputs).to(block.gate.weight.device, block.gate.weight.dtype)
        logits, outputs = block.gate(x).float(), block.experts.apply_all(x).float()
        return cls(logits, outputs, block.top_k, block.norm_topk_prob, block.router_scoring)

    def output(
        self, removed: list[int], redirect: dict[int, int] | None = None, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The MoE output [T, H] (or of `rows` only) with `removed` experts gone: re-picked, or redirected when a
        map is given."""
        return self._combine(*self.route(removed, redirect, rows), rows)

    def route(
        self, removed: list[int], redirect: dict[int, int] | None = None, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert ids [T, k], weights [T, k]) of the tokens (or `rows`) with `removed` experts gone, routed by
        the engine's own routing stage under the policy serving would install."""
        logits = self.logits if rows is None else self.logits[rows]
        num_experts, device = logits.shape[1], logits.device
        policy = None
        if redirect:
            table = torch.arange(num_experts, device=device)
            table[list(redirect)] = torch.tensor(list(redirect.values()), device=device)
            policy = RoutingPolicy(redirect=table)
        elif removed:
            kept = torch.ones(num_experts, dtype=torch.bool, device=device)
            kept[removed] = False
            policy = RoutingPolicy(kept_experts=kept)
        routing = route(logits, self.top_k, self.norm_topk_prob, policy, scoring=self.router_scoring)
        return routing.expert_ids, routing.weights

    def _combine(self, ids: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        tokens = (torch.arange(ids.shape[0], device=ids.device) if rows is None else rows)[:, None]
        return (self.outputs[ids, tokens] * weights[..., None]).sum(dim=1)


def redirect_targets(similarity: np.ndarray, removed: list[int]) -> dict[int, int]:
    """Each removed expert's slot goes to the surviving expert whose outputs are most similar (lowest id on ties)."""
    survivors = np.array([e for e in range(len(similarity)) if e not in set(removed)])
    return {e: int(survivors[np.argmax(similarity[e, survivors])]) for e in removed}


def removal_path(
    replay: LayerReplay, similarity: np.ndarray, count: int, handling: str, per_token: bool = False
) -> list[tuple[int, float]]:
    """Greedy removal of `count` experts: (expert, relative output error once it and all before it are gone).
    The error sums squared output changes over tokens; `per_token` first divides each token's by its unpruned
    output's squared norm, so every token counts alike rather than in proportion to its output's energy."""
    if handling not in HANDLINGS:
        raise ValueError(f"unknown handling {handling!r} of a removed expert's tokens; expected one of {HANDLINGS}")
    full = replay.output([])
    token_sq = full.pow(2).sum(dim=-1)
    if per_token:
        token_weights = 1.0 / token_sq.double().clamp_min(float(token_sq.mean()) * 1e-3)
        scale = float((token_sq.double() * token_weights).sum())
    else:
        token_weights, scale = torch.ones_like(token_sq, dtype=torch.float64), float(token_sq.sum())
    if handling == "repick":
        return _repick_path(replay, full, token_weights, scale, count)
    return _redirect_path(replay, similarity, full, token_weights, scale, count)


def _redirect_path(
    replay: LayerReplay,
    similarity: np.ndarray,
    full: torch.Tensor,
    token_weights: torch.Tensor,
    scale: float,
    count: int,
) -> list[tuple[int, float]]:
    """The greedy path when slots are redirected: routing itself never changes, only which expert serves a
    slot, so a candidate is scored on the tokens whose slots it (or an expert redirected to it) holds."""
    ids, weights = replay.route([])
    num_experts = replay.logits.shape[1]
    served_by = torch.arange(num_experts, device=ids.device)
    token_error = torch.zeros(full.shape[0], dtype=torch.float64, device=full.device)
    removed: list[int] = []
    path = []
    for _ in range(count):
        best: tuple[float, int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        total = float(token_error.sum())
        for e in range(num_experts):
            if e in removed:
                continue
            table = torch.arange(num_experts, device=ids.device)
            for removed_expert, survivor in redirect_targets(similarity, removed + [e]).items():
                table[removed_expert] = survivor
            moved = torch.nonzero(table != served_by).squeeze(1)
            rows = torch.nonzero(torch.isin(ids, moved).any(dim=-1)).squeeze(1)
            out = (replay.outputs[table[ids[rows]], rows[:, None]] * weights[rows][..., None]).sum(dim=1)
            changed = (out - full[rows]).pow(2).sum(dim=-1).double() * token_weights[rows]
            error = total - float(token_error[rows].sum()) + float(changed.sum())
            if best is None or error < best[0]:
                best = (error, e, table, rows, changed)
        assert best is not None
        error, expert, served_by, rows, changed = best
        token_error[rows] = changed
        removed.append(expert)
        path.append((expert, error / scale))
    return path


def _repick_path(
    replay: LayerReplay, full: torch.Tensor, token_weights: torch.Tensor, scale: float, count: int
) -> list[tuple[int, float]]:
    """The greedy path when tokens re-pick, scored exactly but cheaply: removing e re-routes only the tokens
    that route to e now; every other token keeps its experts, with weights scaled by 1 / (1 - p_e) when the
    softmax loses e (unless top-k weights are renormalized), so its error follows from three dot products."""
    removed: list[int] = []
    full_sq = full.pow(2).sum(dim=-1).double()
    path = []
    for _ in range(count):
        ids, _ = replay.route(removed)
        current = replay.output(removed)
        probs = torch.softmax(replay.logits.index_fill(1, torch.tensor(removed, dtype=torch.long), float("-inf")), -1)
        current_sq = current.pow(2).sum(dim=-1).double()
        cross = (current * full).sum(dim=-1).double()
        best: tuple[float, int] | None = None
        for e in range(replay.logits.shape[1]):
            if e in removed:
                continue
            rerouted = (ids == e).any(dim=-1)
            rows = torch.nonzero(rerouted).squeeze(1)
            changed = (replay.output(removed + [e], rows=rows) - full[rows]).pow(2).sum(
                dim=-1
            ).double() * token_weights[rows]
            grow = torch.ones_like(full_sq) if replay.norm_topk_prob else 1.0 / (1.0 - probs[:, e].double())
            kept_error = (grow.pow(2) * current_sq - 2 * grow * cross + full_sq) * token_weights
            error = float(changed.sum()) + float(kept_error[~rerouted].sum())
            if best is None or error < best[0]:
                best = (error, e)
        assert best is not None
        removed.append(best[1])
        path.append((best[1], best[0] / scale))
    return path


def layer_budgets(paths: dict[int, list[tuple[int, float]]], total: int) -> dict[int, int]:
    """Split `total` removals over layers by cost: repeatedly take the cheapest next removal of any layer."""
    taken = dict.fromkeys(paths, 0)
    for _ in range(total):
        open_layers = [layer for layer in paths if taken[layer] < len(paths[layer])]
        if not open_layers:
            raise ValueError(f"cannot remove {total} experts: every layer is down to top_k")
        cheapest = min(open_layers, key=lambda layer: (paths[layer][taken[layer]][1], layer))
        taken[cheapest] += 1
    return taken
