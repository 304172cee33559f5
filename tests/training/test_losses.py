"""The balancing losses equal direct computations of the paper's formulas on known inputs."""

from __future__ import annotations

import math

import torch

from training.losses import lbl_loss, router_orthogonality, simbal_loss, z_loss


def test_simbal_is_zero_for_orthonormal_rows_and_the_l1_sum_otherwise() -> None:
    q, _ = torch.linalg.qr(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)))
    orthonormal_rows = q.T  # [8 experts, 16 hidden]
    assert simbal_loss(orthonormal_rows) < 1e-5
    w = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # W W^T - I = [[0, 1], [1, 1]]
    assert simbal_loss(w) == 3.0
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    direct = sum(abs(float(w[j] @ w[k]) - (j == k)) for j in range(6) for k in range(6))
    assert math.isclose(float(simbal_loss(w)), direct, rel_tol=1e-5)


def test_lbl_gives_top_k_for_perfectly_balanced_routing() -> None:
    experts, k, seqs, tokens = 8, 2, 3, 16
    logits = torch.zeros(seqs, tokens, experts)  # uniform probabilities
    ids = torch.arange(tokens * k).remainder(experts).view(1, tokens, k).expand(seqs, -1, -1)  # equal counts
    assert math.isclose(float(lbl_loss("softmax", logits, ids, experts)), k, rel_tol=1e-6)


def test_lbl_matches_the_formula_per_sequence_then_averaged() -> None:
    g = torch.Generator().manual_seed(2)
    experts, k = 6, 2
    logits = torch.randn(2, 10, experts, generator=g)
    ids = torch.topk(logits, k, dim=-1).indices
    expected = 0.0
    for s in range(2):
        probs = torch.softmax(logits[s], -1)
        f = [sum(int(e in ids[s, t].tolist()) for t in range(10)) / 10 for e in range(experts)]
        p = probs.mean(0).tolist()
        expected += experts * sum(fi * pi for fi, pi in zip(f, p, strict=True)) / 2
    assert math.isclose(float(lbl_loss("softmax", logits, ids, experts)), expected, rel_tol=1e-5)
    # All tokens on the same k experts with all probability there: E * sum f_i P_i = E * k * (1 / k) = E.
    collapsed = torch.full((1, 4, experts), -1e9)
    collapsed[..., :k] = 0.0
    assert math.isclose(
        float(lbl_loss("softmax", collapsed, torch.arange(k).expand(1, 4, k), experts)), experts, rel_tol=1e-6
    )


def test_z_loss_and_orthogonality_measure() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert math.isclose(float(z_loss(logits)), (math.log(2) ** 2 + math.log(4) ** 2) / 2, rel_tol=1e-6)
    assert router_orthogonality(torch.eye(4, 8)) == 0.0
    assert math.isclose(router_orthogonality(2 * torch.eye(2, 3)), (9 + 9) / 4)


def test_lbl_with_sparse_gates_averages_only_the_selected_probabilities() -> None:
    logits = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 2.0, 1.0]]])  # one sequence, two tokens, three experts
    ids = torch.topk(logits, 1, dim=-1).indices
    probs = torch.softmax(logits, -1)[0]
    f = [0.5, 0.5, 0.0]
    p = [float(probs[0, 0]) / 2, float(probs[1, 1]) / 2, 0.0]
    expected = 3 * sum(a * b for a, b in zip(f, p, strict=True))
    assert math.isclose(float(lbl_loss("gates", logits, ids, 3)), expected, rel_tol=1e-6)
