"""Expert placement: contiguous and load-balanced assignment of experts to ranks, the fit rule, JSON files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.expert_placement import (
    NO_HOME,
    ExpertPlacement,
    PlacementError,
    balanced_placement,
    contiguous_placement,
    load_imbalance,
    load_placement,
    rank_loads,
    save_placement,
)


def test_contiguous_placement_cuts_each_layer_into_near_equal_blocks() -> None:
    placement = contiguous_placement([0, 2], 10, 4)
    assert placement.layers == (0, 2)
    assert placement.owner_row(2) == (0, 0, 0, 1, 1, 1, 2, 2, 3, 3)
    assert placement.local_experts(0, 1) == (3, 4, 5)
    assert placement.local_experts(0, 3) == (8, 9)
    with pytest.raises(ValueError, match="layer 1 is not in the placement"):
        placement.owner_row(1)


def test_skewed_load_is_spread_better_than_contiguous_blocks() -> None:
    # Two layers of 8 experts whose low ids are hot: contiguous blocks put the hot ones on rank 0.
    counts = np.array([[400, 300, 200, 100, 40, 30, 20, 10], [50, 900, 60, 10, 10, 10, 5, 5]])
    contiguous = contiguous_placement(2, 8, 2)
    balanced = balanced_placement(counts, 2)
    assert rank_loads(contiguous, counts)[0] == [1000.0, 100.0]
    assert rank_loads(balanced, counts)[0] == [550.0, 550.0]
    assert load_imbalance(contiguous, counts) > 1.6
    assert load_imbalance(balanced, counts) < 1.5
    assert load_imbalance(balanced, counts) < load_imbalance(contiguous, counts)
    # Memory stays even too: every rank holds 4 of the 8 experts of each layer, even beside the 900-token one.
    assert all(len(balanced.local_experts(layer, rank)) == 4 for layer in (0, 1) for rank in (0, 1))
    assert balanced == balanced_placement(counts, 2)  # deterministic, ties included


def test_balanced_placement_ties_and_zero_counts_give_every_rank_an_expert() -> None:
    counts = [[100, 0, 0, 0, 0]]
    placement = balanced_placement(counts, 4)
    assert placement.owner_row(0) == (0, 1, 2, 3, 1)
    assert load_imbalance(placement, [[0] * 5]) == 1.0


def test_pruned_experts_have_no_home() -> None:
    counts = np.arange(40).reshape(4, 10)
    pruned = {1: [0, 9], 3: [2, 3, 4]}
    for placement in (
        balanced_placement(counts, 3, layers=[1, 3], pruned=pruned),
        contiguous_placement([1, 3], 10, 3, pruned),
    ):
        assert {e for e, owner in enumerate(placement.owner_row(1)) if owner == NO_HOME} == {0, 9}
        assert {e for e, owner in enumerate(placement.owner_row(3)) if owner == NO_HOME} == {2, 3, 4}
        assert sorted(e for r in range(3) for e in placement.local_experts(3, r)) == [0, 1, 5, 6, 7, 8, 9]
        assert sum(rank_loads(placement, counts)[1]) == sum(counts[3]) - 2 - 3 - 4 - 20 - 30 - 40


def test_more_ranks_than_experts_with_a_home_is_refused() -> None:
    with pytest.raises(ValueError, match="5 ranks do not fit layer 0: it has 4 experts with a home"):
        contiguous_placement(1, 4, 5)
    with pytest.raises(
        ValueError, match="3 ranks do not fit layer 2: it has 2 experts with a home .8 experts, 6 pruned"
    ):
        balanced_placement(np.ones((3, 8)), 3, layers=[0, 2], pruned={2: range(6)})
    with pytest.raises(ValueError, match="ranks \\[2\\] hold no expert"):
        ExpertPlacement(3, (0,), ((0, 1, 1, NO_HOME),))
    with pytest.raises(ValueError, match="owners must be ranks 0..1 or -1"):
        ExpertPlacement(2, (0,), ((0, 1, 2),))
    with pytest.raises(ValueError, match="not expert ids 0..3"):
        contiguous_placement(1, 4, 2, {0: [4]})


def test_json_round_trip_and_errors_name_the_file_and_field(tmp_path: Path) -> None:
    placement = balanced_placement([[5, 1, 4, 2], [1, 1, 1, 1]], 2, pruned={1: [3]})
    path = tmp_path / "placement.json"
    save_placement(placement, path)
    assert json.loads(path.read_text())["layers"]["1"][3] is None
    assert load_placement(path) == placement

    cases = [
        ("[]", "expected a JSON object"),
        ('{"num_ranks": "2", "layers": {"0": [0, 1]}}', "field 'num_ranks' must be an integer"),
        ('{"num_ranks": 2, "layers": {}}', "field 'layers' must be a non-empty object"),
        ('{"num_ranks": 2, "layers": {"x": [0, 1]}}', "field 'layers' has key 'x'"),
        ('{"num_ranks": 2, "layers": {"0": [0, -1]}}', "field 'layers.0' must be a list of ranks"),
        ('{"num_ranks": 3, "layers": {"0": [0, 1]}}', "3 ranks do not fit layer 0"),
        ("{", "not a readable JSON placement"),
    ]
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(PlacementError, match=message) as error:
            load_placement(path)
        assert str(path) in str(error.value)
