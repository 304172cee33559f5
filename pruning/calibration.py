"""Calibration: run a model over calibration text and record, per MoE layer, what pruning decisions need.

Per layer: tokens routed to each expert, the router's probability mass per expert, and for a budget of evenly
sampled tokens the output of EVERY expert (as PES requires): from those, the mean pairwise cosine matrix
[E, E] (the redundancy map), and REAP's saliency per expert (the mean, over sampled tokens routed to it, of
its gate weight times the norm of its output). The sampled tokens' inputs are kept, so a pruner can replay
the layer's routing and experts on them. Batches stream through the model, so memory stays bounded
whatever the amount of text. It uses the engine's own model through the routing observer seam.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.attention import DenseCausal
from engine.model import MoEForCausalLM
from engine.moe import SparseMoE
from engine.routing import Routing
from measures.pes import expert_cosines, pes_of
from measures.token_sampling import EvenTokenSample


@dataclass(frozen=True)
class LayerCalibration:
    """What calibration measured in one MoE layer (expert ids are the model's)."""

    layer: int
    routed_tokens: np.ndarray  # [E] tokens that picked each expert among their top-k
    similarity: np.ndarray  # [E, E] mean over sampled tokens of the cosine between two experts' outputs
    reap_saliency: np.ndarray  # [E] mean gate x |f_e(x)| over sampled tokens routed to e (0 if none)
    inputs: np.ndarray  # [sampled, H] float32: the sampled tokens' MoE inputs, to replay routing and experts
    num_tokens: int
    num_sampled: int

    @property
    def pes(self) -> float:
        return pes_of(torch.from_numpy(self.similarity))


_ARRAYS = ("routed_tokens", "similarity", "reap_saliency", "inputs")


@dataclass(frozen=True)
class Calibration:
    layers: list[LayerCalibration]

    @property
    def min_pes(self) -> float:
        """The paper's headline: the least redundant layer's PES."""
        return min(layer.pes for layer in self.layers)

    def save(self, path: Path) -> None:
        """One .npz file, written atomically (a reader never sees half a file)."""
        arrays: dict[str, np.ndarray] = {"layers": np.array([layer.layer for layer in self.layers])}
        for layer in self.layers:
            for name in _ARRAYS:
                arrays[f"{layer.layer}.{name}"] = getattr(layer, name)
            arrays[f"{layer.layer}.counts"] = np.array([layer.num_tokens, layer.num_sampled])
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Calibration:
        try:
            with np.load(path) as data:
                layers = []
                for layer in data["layers"].tolist():
                    num_tokens, num_sampled = data[f"{layer}.counts"].tolist()
                    fields = {name: data[f"{layer}.{name}"] for name in _ARRAYS}
                    layers.append(LayerCalibration(layer, num_tokens=num_tokens, num_sampled=num_sampled, **fields))
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{path}: not a calibration file ({exc})") from exc
        return cls(layers)


class _Recorder:
    """Routing observer that accumulates a layer's statistics batch by batch."""

    def __init__(self, num_experts: int, sample: EvenTokenSample) -> None:
        self.num_experts, self.sample = num_experts, sample
        self.routed: dict[int, torch.Tensor] = {}
        self.cosine_sum: dict[int, torch.Tensor] = {}
        self.saliency_sum: dict[int, torch.Tensor] = {}
        self.saliency_count: dict[int, torch.Tensor] = {}
        self.inputs: dict[int, list[torch.Tensor]] = {}

    def __call__(self, block: SparseMoE, x: torch.Tensor, logits: torch.Tensor, routing: Routing) -> None:
        layer, e = block.layer_idx, self.num_experts
        ids = routing.expert_ids
        kept = ids < e  # slots a routing policy dropped carry the sentinel id e
        zeros = torch.zeros(e, dtype=torch.float64, device=x.device)
        routed = torch.bincount(ids[kept], minlength=e).double()
        self.routed[layer] = self.routed.get(layer, zeros) + routed
        rows = self.sample.rows(layer, x.shape[0], x.device)
        if len(rows) == 0:
            return
        outputs = block.experts.apply_all(x[rows])  # [E, T, H]
        cosines = expert_cosines(outputs).double().sum(0)
        self.cosine_sum[layer] = self.cosine_sum.get(layer, torch.zeros(e, e, dtype=torch.float64)) + cosines.cpu()
        gates = torch.zeros(len(rows), e + 1, dtype=torch.float64, device=x.device)
        gates.scatter_add_(1, ids[rows], routing.weights[rows].double())
        gates = gates[:, :e]  # [T, E]: gate weight of each expert a sampled token routed to (0 otherwise)
        norms = outputs.float().norm(dim=-1).double().T  # [T, E]
        self.saliency_sum[layer] = self.saliency_sum.get(layer, zeros) + (gates * norms).sum(0)
        self.saliency_count[layer] = self.saliency_count.get(layer, zeros) + (gates > 0).double().sum(0)
        self.inputs.setdefault(layer, []).append(x[rows].float().cpu())

    def result(self, layers: list[int]) -> Calibration:
        out = []
        for layer in layers:
            count = self.saliency_count[layer]
            saliency = torch.where(count > 0, self.saliency_sum[layer] / count.clamp(min=1), 0.0)
            out.append(
                LayerCalibration(
                    layer=layer,
                    routed_tokens=self.routed[layer].cpu().numpy().astype(np.int64),
                    similarity=(self.cosine_sum[layer] / self.sample.sampled[layer]).numpy(),
                    reap_saliency=saliency.cpu().numpy(),
                    inputs=torch.cat(self.inputs[layer]).numpy(),
                    num_tokens=self.sample.seen[layer],
                    num_sampled=self.sample.sampled[layer],
                )
            )
        return Calibration(out)


@torch.no_grad()
def calibrate(
    model: MoEForCausalLM,
    windows: torch.Tensor,
    batch_size: int = 8,
    sample_tokens: int = 2048,
    progress: bool = False,
) -> Calibration:
    """Run [N, S] token windows through the model (dense causal attention, no KV cache) and measure each MoE
    layer; `sample_tokens` tokens per layer, evenly spread over the whole run, get every expert applied."""
    if windows.ndim != 2 or len(windows) == 0 or sample_tokens < 1:
        raise ValueError(f"calibration needs [N, S] token windows and sample_tokens >= 1, got {tuple(windows.shape)}")
    rows, seq_len = windows.shape
    device = model.lm_head.weight.device
    recorder = _Recorder(model.config.num_experts, EvenTokenSample(rows * seq_len, sample_tokens))
    model.set_routing_observer(recorder)
    try:
        batches = range(math.ceil(rows / batch_size))
        for b in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
            batch = windows[b * batch_size : (b + 1) * batch_size].to(device)
            positions = torch.arange(seq_len, device=device).repeat(len(batch))
            model(batch.reshape(-1), positions, DenseCausal(len(batch), seq_len))
    finally:
        model.set_routing_observer(None)
    return recorder.result(model.config.moe_layers)
