"""Calibration on real (tiny) checkpoints: its counts add up, its similarity map is a cosine matrix, and it
finds experts that compute the same function."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.checkpoint import load_model
from engine.model import MoEForCausalLM
from pruning.calibration import calibrate


def tiny(path: Path) -> MoEForCausalLM:
    return load_model(path, torch.float32, torch.device("cpu")).eval()


def windows(rows: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0))


def test_counts_add_up_and_similarity_is_a_cosine_matrix(tiny_model: Path) -> None:
    model = tiny(tiny_model)
    config = model.config
    result = calibrate(model, windows(6, 16, 256), batch_size=4, sample_tokens=40)
    assert [layer.layer for layer in result.layers] == [i for i in range(config.num_layers) if config.is_moe_layer(i)]
    for layer in result.layers:
        assert layer.num_tokens == 96 and layer.num_sampled == 40  # sampled across both batches
        assert layer.routed_tokens.sum() == 96 * config.top_k
        assert np.allclose(np.diag(layer.similarity), 1, atol=1e-5)
        assert np.allclose(layer.similarity, layer.similarity.T, atol=1e-6)
        assert -1 < layer.pes < 1 and (layer.reap_saliency >= 0).all() and layer.reap_saliency.max() > 0
    assert result.min_pes == min(layer.pes for layer in result.layers)


def test_experts_computing_the_same_function_are_found(tiny_model: Path) -> None:
    model = tiny(tiny_model)
    experts = model.moe_blocks()[0].experts
    with torch.no_grad():
        experts.gate_up_proj[1:] = experts.gate_up_proj[0]
        experts.down_proj[1:] = experts.down_proj[0]
    first = calibrate(model, windows(2, 16, 256), sample_tokens=16).layers[0]
    assert first.pes == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(first.similarity, 1.0, atol=1e-5)


def test_bad_windows_are_refused(tiny_model: Path) -> None:
    with pytest.raises(ValueError, match="token windows"):
        calibrate(tiny(tiny_model), torch.zeros(0, 16, dtype=torch.long))
