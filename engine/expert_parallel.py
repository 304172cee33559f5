"""Expert parallelism over torch.distributed: each rank holds its share of every MoE layer's routed experts.

The scheme is the simplest correct one. Every rank runs the same step on the same inputs (attention, norms,
the router, dense layers and shared experts are replicated); in each MoE layer, each rank computes its own
experts' weighted outputs for all of the step's tokens, and one all-reduce (SUM) over the group combines them
(engine/moe.py). No all-to-all: every rank sends a [tokens, hidden] fp32 sum per layer, whatever the routing.
Because the all-reduce hands every rank the same sum, every rank holds the same hidden states, so samples and
schedules agree too, as long as every rank is given the same requests (and, unseeded, the same torch seed).

A model becomes a shard either at load (`load_model(..., expert_shard=...)`, which never allocates the other
ranks' experts) or after it (`shard_experts`). Experts the placement leaves without a home count as released:
the routing policies must never reach them (`check_experts_served`; set_routing_policies refuses policies that
would). The expert-load counters still count every token once: each rank counts the whole routing, so every
rank's counters equal one process's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.config import CheckpointError, ModelConfig
from engine.expert_placement import ExpertPlacement
from engine.model import MoEForCausalLM


@dataclass(frozen=True)
class ExpertShard:
    """This process's share: the placement and the process group of the ranks it names (None: the default
    group), whose size must be the placement's num_ranks."""

    placement: ExpertPlacement
    group: dist.ProcessGroup | None = None

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def process_group(self) -> dist.ProcessGroup:
        group = self.group or dist.group.WORLD
        assert group is not None  # check() ran: the default group exists
        return group

    def owners(self, layer: int) -> torch.Tensor:
        """long [E]: the rank holding each expert of decoder layer `layer` (-1: none)."""
        return torch.tensor(self.placement.owner_row(layer), dtype=torch.long)

    def raise_if_any_rank_failed(self, error: CheckpointError | None, device: torch.device) -> None:
        """Every rank calls this once after reading its weights: all raise if any rank's read failed (a rank
        that went on would wait in the first collective for ranks that are gone)."""
        failed = torch.tensor([int(error is not None)], device=device)
        dist.all_reduce(failed, group=self.group)
        if error is not None:
            raise error
        if int(failed.item()):
            raise CheckpointError(
                f"{int(failed.item())} other rank(s) found a defect in their experts' weights; their errors name it"
            )

    def smallest(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's `value` (a collective: every rank calls it), e.g. the KV blocks that
        fit: ranks must schedule alike, so they must agree on what fits."""
        found = torch.tensor([value], dtype=torch.long, device=device)
        dist.all_reduce(found, dist.ReduceOp.MIN, group=self.group)
        return int(found.item())

    def check(self, config: ModelConfig) -> None:
        """ValueError unless the process group exists with num_ranks ranks and the placement covers exactly the
        model's MoE layers with its number of experts."""
        if not dist.is_initialized():
            raise ValueError("expert parallelism needs torch.distributed initialized (init_process_group)")
        size = dist.get_world_size(self.group)
        if size != self.placement.num_ranks:
            raise ValueError(f"the placement is for {self.placement.num_ranks} ranks, the process group has {size}")
        moe_layers = [i for i in range(config.num_layers) if config.is_moe_layer(i)]
        if sorted(self.placement.layers) != moe_layers:
            raise ValueError(
                f"the placement covers layers {sorted(self.placement.layers)}, the model's MoE layers are {moe_layers}"
            )
        for layer in moe_layers:
            width = len(self.placement.owner_row(layer))
            if width != config.num_experts:
                raise ValueError(f"layer {layer}: the placement has {width} experts, the model {config.num_experts}")


def shard_experts(model: MoEForCausalLM, shard: ExpertShard) -> int:
    """Turn a loaded model into this rank's shard: the other ranks' experts are released, and every MoE
    forward from now on combines the ranks' outputs (a collective: every rank must run the same forwards).
    Install routing policies (and release unrouted experts) first. Returns the bytes released."""
    shard.check(model.config)
    rank, group = shard.rank, shard.process_group
    released = 0
    for block in model.moe_blocks():
        owners = shard.owners(block.layer_idx)
        # Checked for every rank's experts alike, so that every rank refuses (none waits in a collective).
        stale = torch.nonzero((owners >= 0) & ~block.present_experts()).squeeze(1).tolist()
        if stale:
            raise ValueError(
                f"layer {block.layer_idx}: the placement gives experts {stale} a home, but their weights were "
                "released (pruned): give them none"
            )
        released += block.release_experts(owners == rank)
        block.join_expert_parallel(owners, rank, group)
    check_experts_served(model)
    return released


def check_experts_served(model: MoEForCausalLM) -> None:
    """ValueError naming the layer and experts if the installed routing can reach an expert that no rank
    holds (a placement that pruned more than the routing policies do)."""
    for block in model.moe_blocks():
        reachable = (
            torch.ones(block.num_experts, dtype=torch.bool)
            if block.policy is None
            else block.policy.reachable_experts(block.num_experts)
        )
        missing = torch.nonzero(reachable & ~block.servable_experts()).squeeze(1).tolist()
        if missing:
            raise ValueError(
                f"layer {block.layer_idx}: routing can reach experts {missing}, which no rank holds: install "
                "routing policies that prune them, or give them a home in the placement"
            )


def resident_expert_bytes(model: MoEForCausalLM) -> int:
    """Bytes of routed-expert weights this process holds (Experts.nbytes over the MoE layers)."""
    return sum(block.experts.nbytes() for block in model.moe_blocks())
