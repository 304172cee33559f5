"""The baselines rank experts as their authors define them, and levels keep at least top_k experts."""

from __future__ import annotations

import numpy as np
import pytest

from pruning.calibration import LayerCalibration
from pruning.methods import experts_to_remove, removal_order


def layer(routed: list[int], saliency: list[float], index: int = 0) -> LayerCalibration:
    e = len(routed)
    return LayerCalibration(
        layer=index,
        routed_tokens=np.array(routed),
        similarity=np.eye(e),
        reap_saliency=np.array(saliency),
        inputs=np.zeros((0, 4), dtype=np.float32),
        num_tokens=sum(routed),
        num_sampled=sum(routed),
    )


def test_frequency_removes_the_least_routed_and_reap_the_least_salient() -> None:
    calibrated = layer(routed=[50, 3, 20, 3, 90, 7], saliency=[0.1, 2.0, 0.5, 0.05, 1.0, 0.3])
    assert removal_order("frequency", calibrated) == [1, 3, 5, 2, 0, 4]  # ties by expert id
    assert removal_order("reap", calibrated) == [3, 0, 5, 2, 4, 1]
    half = experts_to_remove(6, 2, 0.5)
    assert sorted(set(range(6)) - set(removal_order("frequency", calibrated)[:half])) == [0, 2, 4]
    assert sorted(set(range(6)) - set(removal_order("reap", calibrated)[:half])) == [1, 2, 4]


def test_random_is_seeded_per_layer() -> None:
    first, second = layer([1] * 16, [1.0] * 16, index=0), layer([1] * 16, [1.0] * 16, index=1)
    assert removal_order("random", first, seed=3) == removal_order("random", first, seed=3)
    assert removal_order("random", first, seed=3) != removal_order("random", first, seed=4)
    assert removal_order("random", first, seed=3) != removal_order("random", second, seed=3)
    assert sorted(removal_order("random", first)) == list(range(16))


def test_levels_round_to_expert_counts_and_keep_top_k() -> None:
    assert [experts_to_remove(32, 4, level) for level in (0, 0.125, 0.25, 0.375, 0.5)] == [0, 4, 8, 12, 16]
    assert experts_to_remove(8, 2, 0.0) == 0
    with pytest.raises(ValueError, match="highest level this model allows is 0.75"):
        experts_to_remove(8, 2, 0.9)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        experts_to_remove(8, 2, 1.0)
    with pytest.raises(ValueError, match="unknown pruning method 'magic'"):
        removal_order("magic", layer([1, 2], [1.0, 2.0]))
