"""Fixtures for training tests: a small corpus from user files and a tokenizer trained on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corpus.splits import DEFAULT_CORPUS_DIR, read_split
from engine.tokenizer import save_tokenizer_files
from training.bpe import train_tokenizer
from training.corpus import build_corpus
from training.trainer import TrainConfig

# A model small enough to train for a few steps in a second or two.
TINY: dict[str, object] = {
    "layers": 2,
    "hidden": 64,
    "heads": 4,
    "kv_heads": 2,
    "experts": 8,
    "expert_width": 32,
    "top_k": 2,
    "seq_len": 32,
    "batch_size": 4,
    "warmup_steps": 1,
    "eval_every": 4,
    "eval_tokens": 512,
    "pes_tokens": 64,
    "checkpoint_every": 2,
    "log_every": 1,
    "lr": 1e-2,
}


def tiny_config(**changes: object) -> TrainConfig:
    return TrainConfig(**{**TINY, "steps": 6, **changes})  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corpus built through `build_corpus` from user files: 60 documents of the bundled validation split."""
    files = tmp_path_factory.mktemp("texts")
    for i, text in enumerate(read_split("validation", DEFAULT_CORPUS_DIR)[:60]):
        (files / f"doc{i:02d}.txt").write_text(text[:6000])
    out = tmp_path_factory.mktemp("corpus") / "corpus"
    manifest = build_corpus(out, files=[files])
    assert json.loads((out / "manifest.json").read_text()) == manifest
    return out


@pytest.fixture(scope="session")
def small_tokenizer(small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer_files(train_tokenizer(read_split("train", small_corpus), vocab_size=400), out)
    return out
