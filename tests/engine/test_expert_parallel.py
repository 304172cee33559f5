"""Expert parallelism over gloo ranks on loopback: a sharded model and engine agree with one process.

Each test starts its ranks with torch.multiprocessing (one thread each, a file:// store in tmp_path); a rank
runs a job and saves what it found for the test to compare with the single-process model in this process.
"""

from __future__ import annotations

import functools
import multiprocessing
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from engine import LLM, CheckpointError, RoutingPolicy, SamplingParams
from engine.attention import DenseCausal
from engine.checkpoint import load_model
from engine.config import ModelConfig
from engine.expert_parallel import ExpertShard, resident_expert_bytes, shard_experts
from engine.expert_placement import ExpertPlacement, balanced_placement, contiguous_placement
from engine.model import MoEForCausalLM
from tests.conftest import copy_checkpoint, write_hf_checkpoint
from tests.engine.test_checkpoint import fuse_experts

CPU = torch.device("cpu")
Job = Callable[[int], dict[str, Any]]
PROMPTS = [list(range(20, 31)), list(range(100, 104)), [7, 9, 11, 13, 15, 17, 19, 21, 23], list(range(60, 80)), [5]]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
# Continuous batching: at most 3 sequences at once and chunked prefills, so steps mix prefill and decode.
ENGINE_ARGS: dict[str, Any] = {"dtype": "float32", "device": "cpu", "max_num_seqs": 3, "max_num_batched_tokens": 8}


def run_ranks(world: int, tmp_path: Path, job: Job) -> list[dict[str, Any]]:
    """Run `job(rank)` on `world` gloo ranks; their results, by rank. Ranks fork from a server that imported
    this module once, so a start costs a fork, not an import of torch."""
    multiprocessing.get_context("forkserver").set_forkserver_preload([__name__])
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.multiprocessing.start_processes(
        _rank_main, args=(world, tmp_path, job), nprocs=world, start_method="forkserver"
    )
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def _rank_main(rank: int, world: int, tmp_path: Path, job: Job) -> None:
    torch.set_num_threads(1)
    store = tmp_path / "store"
    dist.init_process_group("gloo", f"file://{store}", timedelta(seconds=120), world, rank)
    try:
        torch.save(job(rank), tmp_path / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def moe_layers(path: Path) -> list[int]:
    config = ModelConfig.from_dir(path)
    return [i for i in range(config.num_layers) if config.is_moe_layer(i)]


def dense_logits(model: MoEForCausalLM) -> torch.Tensor:
    batch = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.compute_logits(model(batch.flatten(), torch.arange(12).repeat(3), DenseCausal(3, 12)))


def forward_job(path: Path, placement: ExpertPlacement, at_load: bool, rank: int) -> dict[str, Any]:
    """A sharded model's logits on a dense batch, its resident expert bytes and its expert-load counts."""
    shard = ExpertShard(placement)
    if at_load:
        model = load_model(path, torch.float32, CPU, expert_shard=shard)
    else:
        model = load_model(path, torch.float32, CPU)
        shard_experts(model, shard)
    logits = dense_logits(model)
    return {"logits": logits, "bytes": resident_expert_bytes(model), "load": model.expert_load.snapshot()}


def generations(llm: LLM) -> dict[str, Any]:
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    return {
        "tokens": [out.outputs[0].token_ids for out in outputs],
        "prompt_logprobs": [
            [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])]
            for out in outputs
        ],
        "load": llm.expert_load(),
    }


def engine_job(path: Path, placement: ExpertPlacement, engine_args: dict[str, Any], rank: int) -> dict[str, Any]:
    """Greedy generation with continuous batching on this rank's engine; also how many MoE forwards routed no
    token slot to this rank's experts."""
    llm = LLM(path, expert_shard=ExpertShard(placement), **ENGINE_ARGS, **engine_args)
    idle = [0]

    def count_idle(block: Any, x: torch.Tensor, logits: torch.Tensor, routing: Any) -> None:
        ids = routing.expert_ids[routing.expert_ids < block.num_experts]
        idle[0] += not bool(block.present_experts()[ids].any())

    llm.engine.model.set_routing_observer(count_idle)
    result = generations(llm)
    return {**result, "idle_forwards": idle[0], "bytes": resident_expert_bytes(llm.engine.model)}


def assert_same_generations(ranks: list[dict[str, Any]], reference: dict[str, Any]) -> None:
    for result in ranks:
        assert result["tokens"] == reference["tokens"]
        for got, want in zip(result["prompt_logprobs"], reference["prompt_logprobs"]):
            assert got == pytest.approx(want, abs=1e-5)
        assert (result["load"] == reference["load"]).all()  # every rank counts every token once


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe", "qwen2_moe"])
def test_two_ranks_match_one_process(arch: str, hf_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    path = hf_checkpoint(arch)
    model = load_model(path, torch.float32, CPU)
    expected = dense_logits(model)
    placement = contiguous_placement(moe_layers(path), model.config.num_experts, 2)
    ranks = run_ranks(2, tmp_path, functools.partial(forward_job, path, placement, True))
    total = resident_expert_bytes(model)
    for result in ranks:
        torch.testing.assert_close(result["logits"], expected, rtol=0, atol=1e-5)
        assert result["bytes"] == total // 2
        assert torch.equal(result["load"], model.expert_load.snapshot())


def test_two_rank_engines_generate_as_one_process(hf_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    path = hf_checkpoint("qwen3_moe")
    reference = generations(LLM(path, **ENGINE_ARGS))
    load = reference["load"]
    placement = balanced_placement(load, 2, layers=moe_layers(path))
    ranks = run_ranks(2, tmp_path, functools.partial(engine_job, path, placement, {}))
    assert_same_generations(ranks, reference)


def test_uneven_experts_on_four_ranks(tmp_path: Path) -> None:
    path = write_hf_checkpoint(tmp_path / "olmoe10", "olmoe", num_experts=10)
    single = LLM(path, **ENGINE_ARGS)
    reference = generations(single)
    placement = balanced_placement(reference["load"], 4, layers=moe_layers(path))
    assert sorted(len(placement.local_experts(0, r)) for r in range(4)) == [2, 2, 3, 3]
    ranks = run_ranks(4, tmp_path, functools.partial(engine_job, path, placement, {}))
    assert_same_generations(ranks, reference)
    assert any(result["idle_forwards"] > 0 for result in ranks)  # some rank had no token in some layer's step
    total = resident_expert_bytes(single.engine.model)
    assert sum(result["bytes"] for result in ranks) == total
    assert max(result["bytes"] for result in ranks) <= total * 3 // 10


def test_pruning_policies_with_expert_parallelism(hf_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    path = hf_checkpoint("olmoe")
    layers = moe_layers(path)
    removed = {layers[0]: [1, 4, 6], layers[-1]: [0, 7]}
    policies = {}
    for layer, experts in removed.items():
        kept = torch.ones(8, dtype=torch.bool)
        kept[experts] = False
        policies[layer] = RoutingPolicy(kept_experts=kept)
    single = LLM(path, routing_policies=policies, **ENGINE_ARGS)
    reference = generations(single)
    placement = balanced_placement(reference["load"], 2, layers=layers, pruned=removed)
    ranks = run_ranks(2, tmp_path, functools.partial(engine_job, path, placement, {"routing_policies": policies}))
    assert_same_generations(ranks, reference)
    assert sum(result["bytes"] for result in ranks) == resident_expert_bytes(single.engine.model)


def refusals_job(path: Path, broken: Path, rank: int) -> dict[str, Any]:
    """The error messages of shards that do not fit the model, the group or the routing."""
    layers = moe_layers(path)
    pruned = contiguous_placement(layers, 8, 2, pruned={layers[0]: [3]})
    kept = torch.ones(8, dtype=torch.bool)
    kept[3] = False
    attempts: dict[str, Callable[[], object]] = {
        "ranks": lambda: load_model(
            path, torch.float32, CPU, expert_shard=ExpertShard(contiguous_placement(layers, 8, 3))
        ),
        "layers": lambda: load_model(
            path, torch.float32, CPU, expert_shard=ExpertShard(contiguous_placement(layers[1:], 8, 2))
        ),
        "experts": lambda: load_model(
            path, torch.float32, CPU, expert_shard=ExpertShard(contiguous_placement(layers, 10, 2))
        ),
        "unserved": lambda: LLM(path, expert_shard=ExpertShard(pruned), **ENGINE_ARGS),
        "unserved_after_load": lambda: shard_experts(load_model(path, torch.float32, CPU), ExpertShard(pruned)),
        "policy": lambda: load_model(path, torch.float32, CPU, expert_shard=ExpertShard(pruned)).set_routing_policies(
            {layers[0]: RoutingPolicy(kept_experts=kept.roll(1))}
        ),
        "released": lambda: released_then_sharded(path, {layers[0]: RoutingPolicy(kept_experts=kept)}),
        "defect": lambda: load_model(
            broken, torch.float32, CPU, expert_shard=ExpertShard(contiguous_placement(layers, 8, 2))
        ),
    }
    errors = {}
    for name, attempt in attempts.items():
        try:
            attempt()
        except (ValueError, CheckpointError) as error:
            errors[name] = f"{type(error).__name__}: {error}"
    # Served once the routing policies prune what the placement left without a home.
    llm = LLM(
        path,
        expert_shard=ExpertShard(pruned),
        routing_policies={layers[0]: RoutingPolicy(kept_experts=kept)},
        **ENGINE_ARGS,
    )
    errors["served"] = str(llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids)
    return errors


def released_then_sharded(path: Path, policies: dict[int, RoutingPolicy]) -> None:
    model = load_model(path, torch.float32, CPU)
    model.set_routing_policies(policies)
    model.release_unrouted_experts()
    shard_experts(model, ExpertShard(contiguous_placement(moe_layers(path), 8, 2)))


def test_fused_checkpoint_at_load_and_a_loaded_model(hf_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    fused = copy_checkpoint(hf_checkpoint("olmoe"), tmp_path / "fused")
    fuse_experts(fused)  # stacked expert tensors: each rank reads its rows of them
    placement = balanced_placement(torch.arange(24).view(3, 8).flip(1), 2)
    for at_load, checkpoint in ((True, fused), (False, hf_checkpoint("mixtral"))):
        model = load_model(checkpoint, torch.float32, CPU)
        ranks = run_ranks(2, tmp_path / str(at_load), functools.partial(forward_job, checkpoint, placement, at_load))
        for result in ranks:
            torch.testing.assert_close(result["logits"], dense_logits(model), rtol=0, atol=1e-5)
            assert result["bytes"] == resident_expert_bytes(model) // 2


def test_shards_that_do_not_fit_are_refused(hf_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    path = hf_checkpoint("qwen2_moe")  # MoE layers 0 and 2, a dense layer 1
    with pytest.raises(ValueError, match="needs torch.distributed initialized"):
        load_model(path, torch.float32, CPU, expert_shard=ExpertShard(contiguous_placement([0, 2], 8, 2)))
    broken = copy_checkpoint(path, tmp_path / "broken")
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["model.layers.2.mlp.experts.6.down_proj.weight"][0, 0] = float("inf")  # an expert of rank 1
    save_file(tensors, str(broken / "model.safetensors"))
    ranks = run_ranks(2, tmp_path, functools.partial(refusals_job, path, broken))
    assert ranks[1]["defect"].startswith("CheckpointError: ")
    assert "tensor model.layers.2.mlp.experts.6.down_proj.weight holds 1 NaN or infinite" in ranks[1]["defect"]
    assert ranks[0]["defect"].startswith("CheckpointError: 1 other rank(s) found a defect")
    for errors in ranks:
        errors = {name: error.removeprefix("ValueError: ") for name, error in errors.items()}
        assert errors["ranks"] == "the placement is for 3 ranks, the process group has 2"
        assert errors["layers"] == "the placement covers layers [2], the model's MoE layers are [0, 2]"
        assert errors["experts"] == "layer 0: the placement has 10 experts, the model 8"
        for name in ("unserved", "unserved_after_load"):
            assert errors[name].startswith("layer 0: routing can reach experts [3], which no rank holds")
        assert "reaches experts [3], whose weights were released (or that no rank holds)" in errors["policy"]
        assert errors["released"].startswith("layer 0: the placement gives experts [3] a home, but their weights")
        assert len(errors["served"].split(",")) == GREEDY.max_tokens


@pytest.mark.slow
def test_compiled_forward_with_two_ranks(hf_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    path = hf_checkpoint("qwen3_moe")
    reference = generations(LLM(path, **ENGINE_ARGS))
    placement = contiguous_placement(moe_layers(path), 8, 2)
    ranks = run_ranks(2, tmp_path, functools.partial(engine_job, path, placement, {"enforce_eager": False}))
    assert_same_generations(ranks, reference)
