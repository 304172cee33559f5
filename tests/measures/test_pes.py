"""PES against its definition: the mean pairwise cosine of every expert's output, per token and per layer."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from measures.pes import expert_cosines, pes_of, pes_per_token


def test_pes_is_the_mean_pairwise_cosine_of_all_experts_outputs() -> None:
    outputs = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(0))  # [experts, tokens, hidden]
    got = pes_per_token(expert_cosines(outputs))
    for t in range(3):
        pairs = [
            F.cosine_similarity(outputs[i, t], outputs[j, t], dim=0) for i, j in itertools.combinations(range(5), 2)
        ]
        assert math.isclose(float(got[t]), float(torch.stack(pairs).mean()), rel_tol=1e-5, abs_tol=1e-6)


def test_identical_experts_have_pes_one_and_opposite_pairs_cancel() -> None:
    same = torch.ones(4, 2, 6)
    assert torch.allclose(pes_per_token(expert_cosines(same)), torch.ones(2))
    opposite = torch.stack([torch.ones(1, 6), -torch.ones(1, 6)])
    assert torch.allclose(pes_per_token(expert_cosines(opposite)), -torch.ones(1))


def test_orthogonal_expert_outputs_have_pes_zero() -> None:
    outputs = torch.eye(4)[:, None, :].expand(4, 3, 4)  # expert e outputs the e-th basis vector for every token
    assert torch.allclose(pes_per_token(expert_cosines(outputs)), torch.zeros(3))


def test_layer_pes_is_the_off_diagonal_mean_of_the_similarity_map() -> None:
    similarity = torch.tensor([[1.0, 0.2, 0.4], [0.2, 1.0, 0.6], [0.4, 0.6, 1.0]])
    assert math.isclose(pes_of(similarity), (0.2 + 0.4 + 0.6) / 3, rel_tol=1e-6)
