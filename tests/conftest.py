"""Shared fixtures: tiny checkpoints of every supported architecture, written by transformers itself.

Engines run eagerly unless a test asks for the compiled forward (enforce_eager=False): compiling each tiny
model would cost the suite minutes, and the compiled path has tests of its own (tests/engine/test_compiled.py)
that check it against eager. Set before the engine is imported; servers started by tests inherit it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("MOE_SERVE_ENFORCE_EAGER", "1")

from engine.architectures import ARCHITECTURES
from engine.paths import cache_root
from engine.random_checkpoint import hf_config, write_tokenizer

torch.set_num_threads(2)

ARCHS = tuple(ARCHITECTURES)


def write_hf_checkpoint(path: Path, model_type: str, seed: int = 0, **shape: Any) -> Path:
    """Create a random model with transformers' own classes and save_pretrained, plus our tokenizer files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    eos = write_tokenizer(path)
    raw = hf_config(model_type, eos_token_id=eos, num_layers=3, **shape)
    raw.update(ARCHITECTURES[model_type].variant_extras)  # exercise the variant's optional parts
    raw["initializer_range"] = 0.1  # peaked distributions: greedy parity is not decided by float noise
    config = AutoConfig.for_model(**raw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: the (cached) tiny transformers-written checkpoint directory of a model_type."""
    cache: dict[str, Path] = {}

    def make(model_type: str) -> Path:
        if model_type not in cache:
            cache[model_type] = write_hf_checkpoint(tmp_path_factory.mktemp(model_type), model_type)
        return cache[model_type]

    return make


@pytest.fixture(scope="session")
def tiny_model(hf_checkpoint: Callable[[str], Path]) -> Path:
    """The default tiny checkpoint for tests that do not care about the architecture."""
    return hf_checkpoint("qwen3_moe")


@pytest.fixture
def own_cache(tmp_path: Path) -> Path:
    """A $MOE_SERVE_CACHE of the test's own (calibrations, plans, token caches) whose C libraries are the session's:
    a server started on it loads them instead of building both again (~10 s of g++ per start). Inductor's cache is
    the session's already (engine.paths.use_inductor_cache sets its variable, which child processes inherit)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    shared = cache_root() / "kernels"
    shared.mkdir(parents=True, exist_ok=True)
    (cache / "kernels").symlink_to(shared, target_is_directory=True)
    return cache


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A writable copy of a checkpoint directory, to corrupt in a test."""
    dst.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
