"""Training runs: the loss falls, a killed run resumes to the same weights, and the output directory is a
checkpoint that our engine serves and transformers loads with the same logits."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine import LLM, SamplingParams
from engine.attention import DenseCausal
from engine.checkpoint import load_model
from tests.training.conftest import TINY, tiny_config
from training.trainer import STATE_FILE, TrainConfig, Trainer


def evals(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["eval"] for r in records if "eval" in r]


@pytest.mark.parametrize("method", ["simbal", "lbl", "none"])
def test_a_few_steps_lower_the_validation_loss(
    method: str, small_corpus: Path, small_tokenizer: Path, tmp_path: Path
) -> None:
    config = tiny_config(method=method, steps=8)
    Trainer(config, tmp_path / "m", small_tokenizer, small_corpus).run()
    history = evals(tmp_path / "m")
    assert [len(e["pes"]) for e in history] == [2, 2]
    assert history[-1]["loss"] < history[0]["loss"] - 0.1
    records = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    balance = [r["balance"] for r in records if "balance" in r]
    assert (max(balance) == 0.0) == (method == "none")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["router_balancing"]["method"] == method
    assert saved["router_balancing"]["coef"] == {"simbal": 0.1, "lbl": 0.01, "none": 0.0}[method]
    assert not (tmp_path / "m" / STATE_FILE).exists()


def test_simbal_keeps_the_router_orthogonal(small_corpus: Path, small_tokenizer: Path, tmp_path: Path) -> None:
    Trainer(tiny_config(method="simbal"), tmp_path / "s", small_tokenizer, small_corpus).run()
    Trainer(tiny_config(method="none"), tmp_path / "n", small_tokenizer, small_corpus).run()
    assert max(evals(tmp_path / "s")[-1]["router_orthogonality"]) < 0.1 * min(
        evals(tmp_path / "n")[-1]["router_orthogonality"]
    )


def _train_cli(out: Path, corpus: Path, tokenizer: Path, steps: int) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "training.cli",
        "train",
        str(out),
        "--corpus",
        str(corpus),
        "--tokenizer",
        str(tokenizer),
    ]
    flags = {**TINY, "steps": steps, "checkpoint_every": 3, "eval_every": 100}
    for name, value in flags.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    return args + ["--threads", "1"]


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint_to_the_same_weights(
    small_corpus: Path, small_tokenizer: Path, tmp_path: Path
) -> None:
    steps = 40
    whole = subprocess.run(
        _train_cli(tmp_path / "whole", small_corpus, small_tokenizer, steps),
        capture_output=True,
        text=True,
        check=False,
    )
    assert whole.returncode == 0, whole.stderr
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(_train_cli(killed_dir, small_corpus, small_tokenizer, steps), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed_dir / STATE_FILE).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = torch.load(killed_dir / STATE_FILE, weights_only=True)
    resumed_from = int(state["step"])
    assert 3 <= resumed_from < steps
    resumed = subprocess.run(
        _train_cli(killed_dir, small_corpus, small_tokenizer, steps), capture_output=True, text=True, check=False
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(killed_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, steps + 1))  # each step logged once


def test_resume_refuses_different_settings(small_corpus: Path, small_tokenizer: Path, tmp_path: Path) -> None:
    Trainer(tiny_config(steps=4), tmp_path / "m", small_tokenizer, small_corpus).run(keep_state=True)
    with pytest.raises(ValueError, match="cannot resume with different settings.*lr"):
        Trainer(tiny_config(steps=4, lr=1e-3), tmp_path / "m", small_tokenizer, small_corpus).run()


def test_invalid_settings_are_named() -> None:
    with pytest.raises(ValueError, match="method='simbal2'"):
        TrainConfig(method="simbal2")
    with pytest.raises(ValueError, match="top_k=9"):
        TrainConfig(experts=8, top_k=9)


def test_trained_directory_serves_and_matches_transformers(
    small_corpus: Path, small_tokenizer: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "m"
    Trainer(tiny_config(save_dtype="float32"), out, small_tokenizer, small_corpus).run()
    ours = load_model(out, torch.float32, torch.device("cpu"))
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, ours.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits[0]
        got = ours.compute_logits(ours(ids[0], torch.arange(24), DenseCausal(1, 24)))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    completion = LLM(str(out)).generate(["The king"], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert len(completion.outputs[0].token_ids) == 5


def test_learning_rate_schedule_endpoints() -> None:
    config = TrainConfig(steps=1000, warmup_steps=100, lr=1e-3, min_lr_ratio=0.1)
    assert math.isclose(config.lr_at(0), 1e-4) and math.isclose(config.lr_at(100), 1e-3)
    assert math.isclose(config.lr_at(1000), 1e-4) and config.lr_at(550) < config.lr_at(300)


def test_resume_survives_a_log_line_cut_short_and_keeps_the_final_state(
    small_corpus: Path, small_tokenizer: Path, tmp_path: Path
) -> None:
    out = tmp_path / "m"
    Trainer(tiny_config(steps=4), out, small_tokenizer, small_corpus).run(keep_state=True)
    assert int(torch.load(out / STATE_FILE, weights_only=True)["step"]) == 4
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.')  # a kill in the middle of a write
    Trainer(tiny_config(steps=4), out, small_tokenizer, small_corpus).run()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["step"] <= 4 for line in lines)


def test_corpus_too_small_for_the_context_is_named(small_corpus: Path, small_tokenizer: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="validation split has 10431 tokens, too few for one window of 100000"):
        Trainer(tiny_config(seq_len=100_000), tmp_path / "m", small_tokenizer, small_corpus).run()
