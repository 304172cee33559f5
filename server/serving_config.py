"""What moe-serve's flags resolve to for the engine: the pruning (a plan made or read in a child process), the
engine config and, under expert parallelism, the experts' placement. `moe-serve` and every torchrun rank call
the same function with the same flags, so all ranks build the same config.

Kept light to import, like server/cli.py: torch, the engine and pruning's heavy parts are imported inside the
functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from pruning.settings import PruningSettings

if TYPE_CHECKING:
    from engine.expert_parallel import ExpertShard
    from engine.llm_engine import EngineConfig
    from engine.routing import RoutingPolicy
    from pruning.plan import PruningPlan


@dataclasses.dataclass(frozen=True)
class ResolvedServing:
    """What the flags resolve to for the engine: its config (pruning and expert placement included), and the
    pruning settings and plan the server reports."""

    config: EngineConfig
    pruning: PruningSettings
    plan: PruningPlan | None


def pruning_settings(args: argparse.Namespace) -> PruningSettings:
    """The pruning moe-serve's flags ask for; PlanError naming a flag that cannot be (torch-free: checked before
    the server starts anything)."""
    return PruningSettings(
        args.prune_level,
        args.prune_method,
        args.prune_budget,
        args.prune_handling,
        args.prune_plan,
        args.route_threshold,
        args.top_k,
        args.substitution_keep_top,
        args.substitution_min_similarity,
        args.substitution_drop_unmatched,
        args.similarity_maps,
        tuple(args.calibration_files),
        args.calibration_tokens,
    )


def resolve_serving(args: argparse.Namespace) -> ResolvedServing:
    """The engine's config from moe-serve's flags: every expert-parallel rank calls this with the same flags, so
    all build the same config. ValueError, RuntimeError, CheckpointError or CorpusError if they do not fit."""
    from engine.llm_engine import EngineConfig

    pruning = pruning_settings(args)
    policies, plan, source = resolved_in_child(pruning, args.model, args.device, args.dtype)
    if plan is not None:
        logging.getLogger("moe_serve").info(
            "pruning plan %s at %g (%s, %s) from %s (cache key %s); removed experts by layer: %s",
            plan.method, plan.level, plan.budget, plan.handling, source, source.stem if source else "-", plan.removed(),
        )  # fmt: skip
    config = EngineConfig(
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        gpu_memory_utilization=args.gpu_memory_utilization,
        moe_backend=args.moe_backend,
        enable_prefix_caching=args.enable_prefix_caching,
        routing_policies=policies,
        token_routing=pruning.token_routing(),
        live_pruning=args.enable_admin_api,
        live_pruning_releases_experts=args.live_pruning_releases_experts,
        expert_shard=expert_shard(
            args.model, args.expert_parallel, args.expert_placement, {} if args.enable_admin_api else policies
        ),
    )
    if args.enforce_eager is not None:
        config.enforce_eager = True
    return ResolvedServing(config, pruning, plan)


def expert_shard(
    model: Path, num_ranks: int, placement_file: Path | None, pruning: dict[int, RoutingPolicy]
) -> ExpertShard | None:
    """The experts' placement over num_ranks engine ranks (None for one): the file's, or contiguous blocks of
    the experts that `pruning` can reach (the pruned ones get no home). ValueError (naming the layer, or the
    file and field) if the ranks do not fit the model's experts."""
    import torch

    from engine.config import ModelConfig
    from engine.expert_parallel import ExpertShard
    from engine.expert_placement import contiguous_placement, load_placement

    if num_ranks == 1:
        return None
    config = ModelConfig.from_dir(model)
    if placement_file is None:
        pruned = {
            layer: torch.nonzero(~policy.reachable_experts(config.num_experts)).squeeze(1).tolist()
            for layer, policy in pruning.items()
        }
        return ExpertShard(contiguous_placement(config.moe_layers, config.num_experts, num_ranks, pruned))
    placement = load_placement(placement_file)
    if placement.num_ranks != num_ranks:
        raise ValueError(f"{placement_file}: the placement is for {placement.num_ranks} ranks, not {num_ranks}")
    return ExpertShard(placement)


def resolved_in_child(
    pruning: PruningSettings, model: Path, device: str, dtype: str
) -> tuple[dict[int, RoutingPolicy], PruningPlan | None, Path | None]:
    """resolved(), in a child process when it loads a model (to calibrate, or to read similarity maps): that
    copy of the model then leaves with the child, and the engine process, which inherits this process's memory
    peak at start-up, reports what serving takes."""
    if not (pruning.level or pruning.wants_similarity):
        return resolved(pruning, model, device, dtype)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(resolved, pruning, model, device, dtype).result()


def resolved(
    pruning: PruningSettings, model: Path, device: str, dtype: str
) -> tuple[dict[int, RoutingPolicy], PruningPlan | None, Path | None]:
    """pruning.serving.resolve and the plan's file, in one process (the weights are hashed once)."""
    from pruning.serving import plan_source, resolve

    policies, plan = resolve(pruning, model, device, dtype)
    return policies, plan, plan_source(pruning, model) if plan is not None else None
