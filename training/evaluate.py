"""Validation metrics for MoE training: perplexity and the routing measures the SimBal paper reports.

Per MoE layer: experts that received tokens, load imbalance (max/mean routed tokens), router orthogonality
(mean squared deviation of W W^T from I) and PES (every expert applied to sampled tokens; the mean pairwise
cosine of their outputs, averaged over tokens), with the minimum PES over layers as the headline.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from corpus.splits import DEFAULT_CORPUS_DIR
from corpus.tokens import eval_windows, split_tokens
from engine.checkpoint import load_model
from engine.model import MoEForCausalLM
from engine.moe import SparseMoE
from engine.routing import Routing
from measures.perplexity import perplexity
from measures.pes import expert_cosines, pes_per_token
from measures.token_sampling import EvenTokenSample
from training.losses import router_orthogonality


class _RoutingProbe:
    """Routing observer that applies all experts to a fixed number of each layer's tokens (evenly sampled),
    and sums every token's input (the mean input direction explains much of a router's load imbalance)."""

    def __init__(self, sample: EvenTokenSample) -> None:
        self.sample = sample
        self.sums: dict[int, float] = {}
        self.input_sums: dict[int, torch.Tensor] = {}
        self.input_energy: dict[int, float] = {}

    def __call__(self, block: SparseMoE, x: torch.Tensor, logits: torch.Tensor, routing: Routing) -> None:
        layer = block.layer_idx
        self.input_sums[layer] = self.input_sums.get(layer, 0) + x.double().sum(0)
        self.input_energy[layer] = self.input_energy.get(layer, 0.0) + float(x.double().pow(2).sum())
        rows = self.sample.rows(layer, x.shape[0], x.device)
        if len(rows) == 0:
            return
        values = pes_per_token(expert_cosines(block.experts.apply_all(x[rows])))
        self.sums[layer] = self.sums.get(layer, 0.0) + float(values.sum())


@torch.no_grad()
def evaluate(
    model: MoEForCausalLM, windows: torch.Tensor, batch_size: int = 16, pes_tokens: int = 1024
) -> dict[str, Any]:
    """Loss, perplexity and routing measures over [N, seq_len + 1] token windows."""
    if len(windows) == 0 or pes_tokens < 1:
        raise ValueError(f"evaluation needs windows and pes_tokens >= 1 (got {len(windows)}, {pes_tokens})")
    seq_len = windows.shape[1] - 1
    probe = _RoutingProbe(EvenTokenSample(len(windows) * seq_len, pes_tokens))
    model.set_routing_observer(probe)
    model.expert_load.reset()
    try:
        scored = perplexity(model, windows, batch_size)
    finally:
        model.set_routing_observer(None)
    load = model.expert_load.snapshot().double()
    model.expert_load.reset()
    blocks = model.moe_blocks()
    layers = model.config.moe_layers
    seen, sampled = probe.sample.seen, probe.sample.sampled
    pes = [probe.sums[layer] / sampled[layer] for layer in layers]
    # Correlation, over experts, between a router row's logit for the mean input and the expert's load.
    alignment = [
        float(
            torch.corrcoef(
                torch.stack([block.gate.weight.double() @ probe.input_sums[block.layer_idx], load[block.layer_idx]])
            )[0, 1]
        )
        for block in blocks
    ]
    return {
        "loss": scored.loss,
        "ppl": scored.ppl,
        "tokens": scored.tokens,
        "experts_in_use": [int((load[layer] > 0).sum()) for layer in layers],
        "imbalance": [float(load[layer].max() / load[layer].mean()) for layer in layers],
        "router_orthogonality": [router_orthogonality(block.gate.weight) for block in blocks],
        "pes": pes,
        "min_pes": min(pes),
        "load_vs_mean_input_logit": alignment,
        # Share of the MoE inputs' energy along their mean: |mean x|^2 / mean |x|^2.
        "mean_input_energy": [
            float((probe.input_sums[i] / seen[i]).pow(2).sum()) / (probe.input_energy[i] / seen[i]) for i in layers
        ],
    }


def unigram_perplexity(train_tokens: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fit on train_tokens, on the target tokens."""
    counts = torch.bincount(train_tokens, minlength=vocab_size).double() + 1.0
    log_probs = torch.log(counts / counts.sum())
    return math.exp(-float(log_probs[targets].mean()))


def evaluate_checkpoint(
    model_dir: Path,
    split: str = "test",
    corpus_dir: Path = DEFAULT_CORPUS_DIR,
    batch_size: int = 8,
    pes_tokens: int = 16384,
) -> dict[str, Any]:
    """A saved model's metrics on a whole corpus split, in windows of its context length, beside the unigram
    baseline and bits per byte (comparable across tokenizers)."""
    model = load_model(model_dir, dtype=torch.float32, device=torch.device("cpu"))
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokens = split_tokens(tokenizer, split, corpus_dir)
    seq_len = model.config.max_position_embeddings
    windows = eval_windows(tokens, seq_len, split=split)
    result = evaluate(model, windows, batch_size, pes_tokens)
    targets = windows[:, 1:].reshape(-1)
    text_bytes = len(tokenizer.decode(targets.tolist(), skip_special_tokens=True).encode())
    total = sum(p.numel() for p in model.parameters())
    expert = sum(b.experts.gate_up_proj.numel() + b.experts.down_proj.numel() for b in model.moe_blocks())
    result.update(
        parameters=total,
        active_parameters_per_token=round(total - expert * (1 - model.config.top_k / model.config.num_experts)),
        split=split,
        seq_len=seq_len,
        unigram_ppl=unigram_perplexity(split_tokens(tokenizer, "train", corpus_dir), targets, model.config.vocab_size),
        bits_per_byte=result["loss"] * result["tokens"] / math.log(2) / text_bytes,
        router_balancing=model.router_balancing,
    )
    return result
