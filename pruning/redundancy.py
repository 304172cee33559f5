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

HANDLINGS = ("repick", "redirect")


@dataclass(frozen=True)
class LayerReplay:
    """A layer's router logits [T, E] and every expert's output [E, T, H] on the calibration tokens."""

    logits: torch.Tensor
    outputs: torch.Tensor
    top_k: int
    norm_topk_prob: bool

    @classmethod
    @torch.no_grad()
    def of(cls, block: SparseMoE, inputs: np.ndarray) -> LayerReplay:
        x = torch.from_numpy(inputs).to(block.gate.weight.device, block.gate.weight.dtype)
        return cls(block.gate(x).float(), block.experts.apply_all(x).float(), block.top_k, block.norm_topk_prob)

    def output(self, removed: list[int], redirect: dict[int, int] | None = None) -> torch.Tensor:
        """The MoE output [T, H] with `removed` experts gone: re-picked, or redirected when a map is given."""
        logits = self.logits
        if redirect is None and removed:
            logits = logits.index_fill(1, torch.tensor(removed, device=logits.device), float("-inf"))
        weights, ids = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if redirect:
            table = torch.arange(logits.shape[1], device=ids.device)
            table[list(redirect)] = torch.tensor(list(redirect.values()), device=ids.device)
            ids = table[ids]
        tokens = torch.arange(ids.shape[0], device=ids.device)[:, None]
        return (self.outputs[ids, tokens] * weights[..., None]).sum(dim=1)


def redirect_targets(similarity: np.ndarray, removed: list[int]) -> dict[int, int]:
    """Each removed expert's slot goes to the surviving expert whose outputs are most similar (lowest id on ties)."""
    survivors = np.array([e for e in range(len(similarity)) if e not in set(removed)])
    return {e: int(survivors[np.argmax(similarity[e, survivors])]) for e in removed}


def removal_path(replay: LayerReplay, similarity: np.ndarray, count: int, handling: str) -> list[tuple[int, float]]:
    """Greedy removal of `count` experts: (expert, relative output error once it and all before it are gone)."""
    if handling not in HANDLINGS:
        raise ValueError(f"unknown handling {handling!r} of a removed expert's tokens; expected one of {HANDLINGS}")
    full = replay.output([])
    scale = float(full.pow(2).sum(dim=-1).mean())
    removed: list[int] = []
    path = []
    for _ in range(count):
        best: tuple[float, int] | None = None
        for e in range(len(similarity)):
            if e in removed:
                continue
            trial = removed + [e]
            redirect = redirect_targets(similarity, trial) if handling == "redirect" else None
            error = float((replay.output(trial, redirect) - full).pow(2).sum(dim=-1).mean()) / scale
            if best is None or error < best[0]:
                best = (error, e)
        assert best is not None
        removed.append(best[1])
        path.append((best[1], best[0]))
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
