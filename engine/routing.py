"""The routing stage: router logits -> (expert ids, weights), and the seam where pruning plugs in.

A `RoutingPolicy` per MoE layer changes routing without touching the model: it can remove experts from the
softmax (re-picking top-k among survivors), redirect one expert's slot to another, override top-k, or drop
routed experts whose probability falls below a threshold. Dropped slots carry the sentinel id `num_experts`
and weight 0; dispatch skips them, so they cost no expert FLOPs.

Per-token controls ([T, 4] float, `TokenRouting.row`) are data, not code: each token carries its own budget
(experts per token, probability threshold) and its batch-aware substitution setting, so one step mixes requests
at different budgets and changing them never recompiles a graph. Substitution (SERE/OEA's idea with PES's
similarity map): a step keeps the union of every token's first `keep_top` experts (and every slot of tokens
that do not substitute); each other slot whose expert is outside that union is re-routed, with its weight, to
the most similar expert inside it when their similarity is at least `min_similarity`, so the step reads fewer
experts; a slot landing on an expert its token already uses merges into that slot. Tokens substitute only where
their policy has a similarity map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from engine.token_routing import EXPERTS_PER_TOKEN, KEEP_TOP, MIN_PROB, MIN_SIMILARITY


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=-1)


# Router scoring rules by name (ArchitectureSpec.router_scoring): fp32 router logits [T, E] -> expert scores
# [T, E], from which top-k picks. Experts taken out of routing arrive with logit -inf.
ROUTER_SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"softmax": _softmax}


@dataclass(frozen=True)
class Routing:
    """Per-token routing decision: `expert_ids` [T, k] (num_experts = dropped slot), `weights` [T, k] fp32."""

    expert_ids: torch.Tensor
    weights: torch.Tensor


class LiveExperts(NamedTuple):
    """One MoE layer's live pruning tables (engine.expert_tables): data, so switching them recompiles nothing.
    kept: bool [E], False leaves the softmax; serve: long [E + 1], the expert serving a slot routed to e."""

    kept: torch.Tensor
    serve: torch.Tensor


@dataclass
class RoutingPolicy:
    """Routing overrides for one MoE layer; the defaults leave routing as the checkpoint defines it.

    kept_experts: bool [E]; False removes an expert from the softmax, so its tokens re-pick among survivors.
    redirect: long [E]; a slot selected for expert e is served by expert redirect[e] with e's weight.
    top_k: overrides the model's experts per token.
    min_prob: drops routed experts whose routing probability is below it (no replacement, no renormalization).
    skip_top: masks each token's highest-probability experts and picks top-k among the rest (DeepSeekMoE's
        redundancy test: how much worse are the next-best experts?).
    similarity: float [E, E], how well expert j stands in for expert i (the calibration's PES map); tokens whose
        controls ask for substitution use it. None: no substitution in this layer.
    drop_unmatched: substitution drops a slot it cannot re-route instead of keeping its expert, which bounds
        the experts a step reads by the kept union.
    """

    kept_experts: torch.Tensor | None = None
    redirect: torch.Tensor | None = None
    top_k: int | None = None
    min_prob: float = 0.0
    skip_top: int = 0
    similarity: torch.Tensor | None = None
    drop_unmatched: bool = False

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
        if self.similarity is not None and (
            self.similarity.shape != (num_experts, num_experts) or not self.similarity.is_floating_point()
        ):
            raise ValueError(f"similarity must be a float tensor of shape [{num_experts}, {num_experts}]")

    def reachable_experts(self, num_experts: int) -> torch.Tensor:
        """bool [E]: the experts this policy can ever hand a token to (the others' weights can be released)."""
        selectable = torch.ones(num_experts, dtype=torch.bool) if self.kept_experts is None else self.kept_experts.cpu()
        targets = torch.arange(num_experts) if self.redirect is None else self.redirect.cpu()
        reachable = torch.zeros(num_experts, dtype=torch.bool)
        reachable[targets[selectable]] = True
        return reachable

    def to(self, device: torch.device) -> RoutingPolicy:
        move = lambda t: None if t is None else t.to(device)
        return RoutingPolicy(
            move(self.kept_experts),
            move(self.redirect),
            self.top_k,
            self.min_prob,
            self.skip_top,
            move(self.similarity),
            self.drop_unmatched,
        )


def route(
    router_logits: torch.Tensor,
    top_k: int,
    norm_topk_prob: bool,
    policy: RoutingPolicy | None = None,
    controls: torch.Tensor | None = None,
    live: LiveExperts | None = None,
    scoring: str = "softmax",
) -> Routing:
    """Scores over experts (the `scoring` rule of ROUTER_SCORES: softmax for every architecture so far), top-k,
    optional renormalization, with the layer's policy, the tokens' controls ([T, 4] float: TokenRouting.row of
    each token) and the live pruning tables applied."""
    num_experts = router_logits.shape[-1]
    logits = router_logits.float()
    if policy is not None and policy.kept_experts is not None:
        logits = logits.masked_fill(~policy.kept_experts, float("-inf"))
    if live is not None:
        logits = logits.masked_fill(~live.kept, float("-inf"))
    probs = ROUTER_SCORES[scoring](logits)
    k = policy.top_k if policy is not None and policy.top_k else top_k
    if policy is not None and policy.skip_top:
        top = torch.topk(probs, policy.skip_top, dim=-1).indices
        probs = probs.scatter(-1, top, 0.0)
    weights, expert_ids = torch.topk(probs, k, dim=-1)
    slot = torch.arange(k, device=weights.device)
    if controls is not None:
        weights = weights.masked_fill(slot >= controls[:, EXPERTS_PER_TOKEN : EXPERTS_PER_TOKEN + 1], 0.0)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if policy is None and controls is None and live is None:
        return Routing(expert_ids, weights)
    min_prob = policy.min_prob if policy is not None else 0.0
    threshold = controls[:, MIN_PROB : MIN_PROB + 1].clamp(min=min_prob) if controls is not None else min_prob
    topk_probs = weights if not norm_topk_prob else torch.gather(probs, -1, expert_ids)
    dropped = (topk_probs < threshold) | (weights == 0.0)
    if controls is not None or min_prob > 0.0:
        expert_ids = expert_ids.masked_fill(dropped, num_experts)
        weights = weights.masked_fill(dropped, 0.0)
    if policy is not None and policy.redirect is not None:
        # Append a self-mapped sentinel so dropped slots stay dropped.
        table = torch.cat([policy.redirect, policy.redirect.new_tensor([num_experts])])
        expert_ids = table[expert_ids]
    if live is not None:
        expert_ids = live.serve[expert_ids]
    if controls is not None and policy is not None and policy.similarity is not None:
        expert_ids, weights = _substitute(expert_ids, weights, controls, policy, slot)
    return Routing(expert_ids, weights)


def _substitute(
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    controls: torch.Tensor,
    policy: RoutingPolicy,
    slot: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-aware substitution (module docstring): shapes stay [T, k], so it traces into one graph."""
    assert policy.similarity is not None
    num_experts = policy.similarity.shape[0]
    primary = slot < controls[:, KEEP_TOP : KEEP_TOP + 1]
    kept_ids = torch.where(primary, expert_ids, num_experts).reshape(-1)
    in_union = torch.zeros(num_experts + 1, dtype=torch.int32, device=expert_ids.device)
    in_union = in_union.index_add(0, kept_ids, torch.ones_like(kept_ids, dtype=torch.int32))[:num_experts] > 0
    live = expert_ids < num_experts
    candidate = live & ~primary & ~torch.cat([in_union, in_union.new_zeros(1)])[expert_ids]
    similarity = policy.similarity[expert_ids.clamp(max=num_experts - 1)]  # [T, k, E]
    best_similarity, best = similarity.masked_fill(~in_union, float("-inf")).max(dim=-1)
    swap = candidate & (best_similarity >= controls[:, MIN_SIMILARITY : MIN_SIMILARITY + 1])
    expert_ids = torch.where(swap, best, expert_ids)
    if policy.drop_unmatched:
        unmatched = candidate & ~swap
        expert_ids = expert_ids.masked_fill(unmatched, num_experts)
        weights = weights.masked_fill(unmatched, 0.0)
    return _merge_repeats(expert_ids, weights, num_experts)


def _merge_repeats(
    expert_ids: torch.Tensor, weights: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A token whose slots now name one expert twice gets it once, with the slots' weights summed (the same
    output, computed once): each slot's weight goes to the first slot naming its expert, repeats are dropped."""
    k = expert_ids.shape[1]
    same = expert_ids[:, :, None] == expert_ids[:, None, :]  # [T, k, k]: slot j names slot i's expert
    first = torch.argmax(same.to(torch.int8), dim=-1)  # [T, k]: the first slot naming each slot's expert
    merged = torch.zeros_like(weights).scatter_add(1, first, weights)
    repeat = first != torch.arange(k, device=expert_ids.device)
    return expert_ids.masked_fill(repeat, num_experts), merged.masked_fill(repeat, 0.0)
