"""The router balancing losses as the SimBal paper defines them, and the output z-loss.

Choices the paper leaves open, each a setting of the trainer: per-layer losses are averaged over MoE layers
(`layer_reduction="mean"`, as transformers' load_balancing_loss_func does for LBL), LBL's statistics are taken
per sequence and averaged (the paper's snippet; `lbl_scope="batch"` pools all tokens), and the z-loss is on the
LM head's output logits ("output z-loss"). LBL's P_i is "the mean routing probability" in the paper's text; its
snippet averages the sparse top-k gate weights (`lbl_prob="gates"`), while Switch and OLMoE average the full
softmax (`lbl_prob="softmax"`, the default, which the bundled LBL model was trained with).
"""

from __future__ import annotations

import torch


def simbal_loss(router_weight: torch.Tensor) -> torch.Tensor:
    """Entry-wise L1 norm of W W^T - I for a router weight W [E, hidden] (not divided by E^2)."""
    w = router_weight.float()
    gram = w @ w.T
    return (gram - torch.eye(w.shape[0], device=w.device)).abs().sum()


def lbl_loss(prob: str, router_logits: torch.Tensor, expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """alpha-free LBL, E * sum_i f_i P_i, averaged over the leading (sequence) dimension.

    router_logits [S, T, E] and expert_ids [S, T, k]: f_i is the fraction of a sequence's tokens routed to i
    (sum_i f_i = k), P_i the mean probability of i: of the full softmax (prob="softmax") or of the top-k gates,
    zero where not selected (prob="gates"). Perfectly uniform routing gives exactly k with "softmax".
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    routed = torch.zeros_like(probs).scatter_(-1, expert_ids, 1.0)
    f = routed.mean(dim=-2)
    p = (probs if prob == "softmax" else probs * routed).mean(dim=-2)
    return num_experts * (f * p).sum(dim=-1).mean()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean squared log-partition of output logits [T, V]: keeps them from drifting large (PaLM)."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def router_orthogonality(router_weight: torch.Tensor) -> float:
    """Mean squared deviation of W W^T from the identity (the paper's Table 3 measure)."""
    w = router_weight.detach().float()
    return float((w @ w.T - torch.eye(w.shape[0], device=w.device)).pow(2).mean())
