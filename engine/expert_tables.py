"""Live pruning: which experts each MoE layer may route to, held as data that every step reads.

A start-up plan installed as a `RoutingPolicy` is traced into the compiled graph and lets the engine free the
removed experts' weights. A server that switches pruning while it serves (the admin API) cannot recompile or
reload weights between two steps, so it keeps every expert loaded and routes through two tables instead:
`kept` (bool [layers, E]: False takes the expert out of the softmax, so its tokens re-pick among survivors) and
`serve` (long [layers, E + 1]: a slot routed to expert e is served by serve[e]; serve[E] = E keeps dropped slots
dropped). The compiled step takes them as inputs, so a switch is a copy into them between two steps.
"""

from __future__ import annotations

import torch

from engine.routing import RoutingPolicy


class ExpertTables:
    """Every layer's live expert tables, initially the checkpoint's routing (all kept, each serves itself)."""

    def __init__(self, num_layers: int, num_experts: int, moe_layers: list[int], device: torch.device) -> None:
        self.num_experts = num_experts
        self.moe_layers = moe_layers
        self.kept = torch.ones(num_layers, num_experts, dtype=torch.bool, device=device)
        self.serve = torch.arange(num_experts + 1, device=device).repeat(num_layers, 1)

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensors a step passes to the model's forward (the same two every step: CUDA graphs read them)."""
        return self.kept, self.serve

    def tables_for(self, policies: dict[int, RoutingPolicy], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """New (kept, serve) contents for `policies` (kept_experts and redirect of each MoE layer; layers not
        named route as the checkpoint does); ValueError naming the layer and field that cannot be live."""
        unknown = sorted(set(policies) - set(self.moe_layers))
        if unknown:
            raise ValueError(f"layers {unknown} have no MoE block (MoE layers: {self.moe_layers})")
        kept = torch.ones_like(self.kept, device="cpu")
        serve = torch.arange(self.num_experts + 1).repeat(self.kept.shape[0], 1)
        for layer, policy in policies.items():
            masks_only = policy.top_k is None and policy.min_prob == 0.0 and policy.skip_top == 0
            if not masks_only or policy.similarity is not None or policy.drop_unmatched:
                raise ValueError(
                    f"layer {layer}: live pruning switches kept_experts and redirect only "
                    "(thresholds, top-k and substitution are per-token routing)"
                )
            try:
                policy.validate(self.num_experts, top_k)
            except ValueError as error:
                raise ValueError(f"layer {layer}: {error}") from None
            if policy.kept_experts is not None:
                kept[layer] = policy.kept_experts.cpu()
            if policy.redirect is not None:
                serve[layer, : self.num_experts] = policy.redirect.cpu()
        return kept, serve

    def install(self, tables: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Copy tables from tables_for into place (between steps: the next step routes by them)."""
        self.kept.copy_(tables[0])
        self.serve.copy_(tables[1])
