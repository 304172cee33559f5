"""PES and the routing measures against direct computations."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from training.evaluate import expert_cosines, pes_per_token


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
