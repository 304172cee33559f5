"""The one model definition: dense causal batches (training, calibration) agree with serving, and train."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from engine import LLM, SamplingParams
from engine.attention import DenseCausal
from engine.checkpoint import load_model


def test_dense_batch_matches_transformers_and_trains(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = load_model(tiny_model, torch.float32, torch.device("cpu"))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    batch = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(12).repeat(3)
    logits = model.compute_logits(model(batch.flatten(), positions, DenseCausal(3, 12))).view(3, 12, -1)
    with torch.no_grad():
        expected = reference(batch).logits
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-4, atol=1e-4)

    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].flatten())
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    expert_grads = [block.experts.gate_up_proj.grad for block in model.moe_blocks()]
    assert all(grad.abs().sum() > 0 for grad in expert_grads)


def test_bfloat16_on_cpu_tracks_float32(tiny_model: Path) -> None:
    prompt = list(range(30, 70))
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    full = LLM(tiny_model, dtype="float32", device="cpu", max_model_len=64).generate([prompt], params, use_tqdm=False)
    half = LLM(tiny_model, dtype="bfloat16", device="cpu", max_model_len=64).generate([prompt], params, use_tqdm=False)
    diffs = [
        abs(a[t].logprob - b[t].logprob)
        for a, b, t in zip(full[0].prompt_logprobs[1:], half[0].prompt_logprobs[1:], prompt[1:])
    ]
    assert max(diffs) < 0.1


def test_moe_layers_are_the_layers_with_an_moe_block(hf_checkpoint: Callable[[str], Path]) -> None:
    model = load_model(hf_checkpoint("qwen2_moe"), torch.float32, torch.device("cpu"))  # layer 1 is dense
    assert model.config.moe_layers == [block.layer_idx for block in model.moe_blocks()] == [0, 2]
