"""The routing stage: router logits -> (expert ids, weights), and the seam where pruning plugs in.

A `RoutingPolicy` per MoE layer changes routing without touching the model: it can remove experts from the
softmax (re-picking top-k among survivors), redirect one expert's slot to another, override top-k, or drop
routed experts whose probability falls below a threshold. Dropped slots carry the sentinel id `num_experts`
and weight 0; dispatch skips them, so they cost no expert FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Routing:
    """Per-token routing decision: `expert_ids` [T, k] (num_experts = dropped slot), `weights` [T, k] fp32."""

    expert_ids: torch.Tensor
    weights: torch.Tensor


@dataclass
class RoutingPolicy:
    """Routing overrides for one MoE layer; the defaults leave routing as the checkpoint defines it.

    kept_experts: bool [E]; False removes an expert from the softmax, so its tokens re-pick among survivors.
    redirect: long [E]; a slot selected for expert e is served by expert redirect[e] with e's weight.
    top_k: overrides the model's experts per token.
    min_prob: drops routed experts whose routing probability is below it (no replacement, no renormalization).
    skip_top: masks each token's highest-probability experts and picks top-k among the rest (DeepSeekMoE's
        redundancy test: how much worse are the next-best experts?).
    """

    kept_experts: torch.Tensor | None = None
    redirect: torch.Tensor | None = None
    top_k: int | None = None
    min_prob: float = 0.0
    skip_top: int = 0

    def validate(self, num_experts: int, default_top_k: int) -> None:
        """Raise ValueError naming the field that does not fit a layer of num_experts experts."""
        if self.kept_experts is not None:
            if self.kept_experts.shape != (num_experts,) or self.kept_experts.dtype != torch.bool:
                raise ValueError(f"kept_experts must be a bool tensor of shape [{num_experts}]")
            if int(self.kept_experts.sum()) < (self.top_k or default_top_k):
                raise ValueError("kept_experts must keep at least top_k experts")
        if self.redirect is not None:
            if self.redirect.shape != (num_experts,) or self.redirect.dtype != torch.long:
                raise ValueError(f"redirect must be a long tensor of shape [{num_experts}]")
            if int(self.redirect.min()) < 0 or int(self.redirect.max()) >= num_experts:
                raise ValueError(f"redirect targets must be expert ids in 0..{num_experts - 1}")
        if self.top_k is not None and not 1 <= self.top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts}, got {self.top_k}")
        if not 0.0 <= self.min_prob < 1.0:
            raise ValueError(f"min_prob must be in [0, 1), got {self.min_prob}")
        if not 0 <= self.skip_top <= num_experts - (self.top_k or default_top_k):
            raise ValueError(f"skip_top must leave top_k experts to pick from, got {self.skip_top}")

    def reachable_experts(self, num_experts: int) -> torch.Tensor:
        """bool [E]: the experts this policy can ever hand a token to (the others' weights can be released)."""
        selectable = torch.ones(num_experts, dtype=torch.bool) if self.kept_experts is None else self.kept_experts.cpu()
        targets = torch.arange(num_experts) if self.redirect is None else self.redirect.cpu()
        reachable = torch.zeros(num_experts, dtype=torch.bool)
        reachable[targets[selectable]] = True
        return reachable

    def to(self, device: torch.device) -> RoutingPolicy:
        move = lambda t: None if t is None else t.to(device)
        return RoutingPolicy(move(self.kept_experts), move(self.redirect), self.top_k, self.min_prob, self.skip_top)


def route(
    router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool, policy: RoutingPolicy | None = None
) -> Routing:
    """Softmax over experts, top-k, optional renormalization, with the layer's policy applied."""
    num_experts = router_logits.shape[-1]
    logits = router_logits.float()
    if policy is not None and policy.kept_experts is not None:
        logits = logits.masked_fill(~policy.kept_experts, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    k = policy.top_k if policy is not None and policy.top_k else top_k
    if policy is not None and policy.skip_top:
        top = torch.topk(probs, policy.skip_top, dim=-1).indices
        probs = probs.scatter(-1, top, 0.0)
    weights, expert_ids = torch.topk(probs, k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if policy is None:
        return Routing(expert_ids, weights)
    if policy.min_prob > 0.0:
        topk_probs = weights if not norm_topk_prob else torch.gather(probs, -1, expert_ids)
        dropped = topk_probs < policy.min_prob
        expert_ids = expert_ids.masked_fill(dropped, num_experts)
        weights = weights.masked_fill(dropped, 0.0)
    if policy.redirect is not None:
        # Append a self-mapped sentinel so dropped slots stay dropped.
        table = torch.cat([policy.redirect, policy.redirect.new_tensor([num_experts])])
        expert_ids = table[expert_ids]
    return Routing(expert_ids, weights)
