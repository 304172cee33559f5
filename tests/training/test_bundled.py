"""The bundled models: they load in our engine, say how they were balanced, fit the size budget, and still
reach the test perplexity their model cards record."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer

from corpus.splits import REPO_ROOT
from corpus.tokens import eval_windows, split_tokens
from engine import LLM, SamplingParams
from engine.attention import DenseCausal
from engine.checkpoint import load_model
from training.evaluate import evaluate

pytestmark = pytest.mark.slow  # the bundled models over the whole test split

BUNDLED = {"tiny-simbal": "simbal", "tiny-lbl": "lbl"}


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_model_reaches_its_recorded_test_perplexity(name: str) -> None:
    path = REPO_ROOT / "models" / name
    assert sum(f.stat().st_size for f in path.iterdir()) < 20_000_000
    recorded = json.loads((path / "eval_test.json").read_text())
    model = load_model(path, torch.float32, torch.device("cpu"))
    assert model.router_balancing is not None and model.router_balancing["method"] == BUNDLED[name]
    tokens = split_tokens(Tokenizer.from_file(str(path / "tokenizer.json")), "test")
    result = evaluate(model, eval_windows(tokens, model.config.max_position_embeddings), batch_size=8, pes_tokens=16)
    assert result["tokens"] == recorded["tokens"]
    assert abs(result["ppl"] - recorded["ppl"]) < 1e-3 * recorded["ppl"]
    assert result["ppl"] < recorded["unigram_ppl"] / 5
    assert "Perplexity" in (path / "README.md").read_text()


def test_default_model_generates_words() -> None:
    llm = LLM(str(REPO_ROOT / "models" / "tiny-simbal"))
    text = llm.generate(["And the king said"], SamplingParams(max_tokens=24, temperature=0))[0].outputs[0].text
    words = text.split()
    assert len(words) >= 8 and sum(w.strip(".,;:!?'\"").isalpha() for w in words) >= 0.7 * len(words)


def test_moe_generate_serves_the_bundled_simbal_model_by_default() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "engine.cli", "--prompt", "And the king said", "--max-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("And the king said") and "[8 tokens" in result.stdout


def test_transformers_loads_the_bundled_model_with_the_same_logits() -> None:
    from transformers import AutoModelForCausalLM

    path = REPO_ROOT / "models" / "tiny-simbal"
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ours = load_model(path, torch.float32, torch.device("cpu"))
    ids = torch.tensor([Tokenizer.from_file(str(path / "tokenizer.json")).encode("And the king said unto them").ids])
    with torch.no_grad():
        expected = reference(ids).logits[0]
        got = ours.compute_logits(ours(ids[0], torch.arange(ids.shape[1]), DenseCausal(1, ids.shape[1])))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
