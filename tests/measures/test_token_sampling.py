"""The evenly spread token sample: every k-th token of the whole run whatever its batches, up to the budget."""

from __future__ import annotations

import torch

from measures.token_sampling import EvenTokenSample

CPU = torch.device("cpu")


def sampled_positions(sample: EvenTokenSample, layer: int, batches: list[int]) -> list[int]:
    """The run positions sampled in a layer whose tokens arrive in batches of the given sizes."""
    positions: list[int] = []
    start = 0
    for size in batches:
        positions += [start + int(row) for row in sample.rows(layer, size, CPU)]
        start += size
    return positions


def test_every_kth_token_of_the_run_whatever_the_batches() -> None:
    whole = sampled_positions(EvenTokenSample(total_tokens=100, budget=10), 0, [100])
    assert whole == list(range(0, 100, 10))
    assert sampled_positions(EvenTokenSample(100, 10), 0, [7, 13, 1, 29, 50]) == whole
    assert sampled_positions(EvenTokenSample(100, 10), 0, [3] * 33 + [1]) == whole  # batches shorter than the step


def test_the_budget_caps_each_layer_and_layers_count_apart() -> None:
    sample = EvenTokenSample(total_tokens=10, budget=4)  # every 2nd token
    assert sampled_positions(sample, 3, [10, 10]) == [0, 2, 4, 6]
    assert sampled_positions(sample, 5, [3]) == [0, 2]
    assert (sample.seen, sample.sampled) == ({3: 20, 5: 3}, {3: 4, 5: 2})


def test_a_budget_over_the_run_samples_every_token() -> None:
    assert sampled_positions(EvenTokenSample(total_tokens=5, budget=50), 0, [2, 3]) == [0, 1, 2, 3, 4]
