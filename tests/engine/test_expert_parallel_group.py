"""Start-up agreement between expert-parallel ranks: the same checkpoint, and the same KV cache size."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from engine.config import CheckpointError
from engine.expert_parallel import ExpertShard
from engine.expert_parallel_group import check_same_checkpoint, checkpoint_fingerprint, object_group
from engine.expert_placement import contiguous_placement
from engine.llm_engine import EngineConfig, LLMEngine
from tests.conftest import copy_checkpoint, edit_config
from tests.engine.test_expert_parallel import moe_layers, run_ranks


def checkpoint_job(paths: list[Path], rank: int) -> dict[str, Any]:
    try:
        check_same_checkpoint(paths[rank], object_group())
    except CheckpointError as error:
        return {"error": str(error)}
    return {"error": None}


def test_ranks_on_different_checkpoints_all_refuse_naming_both(
    hf_checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    path = hf_checkpoint("qwen3_moe")
    other = copy_checkpoint(path, tmp_path / "other")
    assert checkpoint_fingerprint(other) == checkpoint_fingerprint(path)  # a copy is the same checkpoint
    edit_config(other, rms_norm_eps=1e-5)
    same = run_ranks(2, tmp_path / "same", functools.partial(checkpoint_job, [path, path]))
    assert [result["error"] for result in same] == [None, None]
    differ = run_ranks(2, tmp_path / "differ", functools.partial(checkpoint_job, [path, other]))
    for result in differ:
        assert result["error"].startswith(f"the expert-parallel ranks disagree on the checkpoint: rank 0 loads {path}")
        assert f"rank 1 loads {other}" in result["error"]


def kv_job(path: Path, rank: int) -> dict[str, Any]:
    placement = contiguous_placement(moe_layers(path), 8, 2)
    settings: dict[str, Any] = {
        "dtype": "float32",
        "device": "cpu",
        "max_model_len": 64,
        "kv_cache_memory_bytes": (rank + 1) << 20,
    }
    blocks = LLMEngine(path, EngineConfig(expert_shard=ExpertShard(placement), **settings)).block_manager.num_blocks
    alone = LLMEngine(path, EngineConfig(**settings))
    dist.barrier()
    return {"blocks": blocks, "alone": alone.block_manager.num_blocks}


def test_ranks_agree_on_the_smallest_kv_cache(hf_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    ranks = run_ranks(2, tmp_path, functools.partial(kv_job, hf_checkpoint("qwen3_moe")))
    assert ranks[0]["alone"] < ranks[1]["alone"]
    assert ranks[0]["blocks"] == ranks[1]["blocks"] == ranks[0]["alone"]
