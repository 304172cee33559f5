"""The pes method on constructed experts: duplicates go first and free, costs drive the per-layer budget, and a
layer's replayed output is the engine's own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.checkpoint import load_model
from engine.model import MoEForCausalLM
from pruning.calibration import Calibration, calibrate
from pruning.redundancy import LayerReplay, layer_budgets, redirect_targets, removal_path
from pruning.selection import select
from pruning.spec import PlanSpec


def model_with_twins(model_dir: Path, twins: dict[int, int], layer_index: int = 0) -> MoEForCausalLM:
    """The tiny model with expert `copy` of one MoE layer made identical to expert `original`."""
    model = load_model(model_dir, torch.float32, torch.device("cpu")).eval()
    experts = model.moe_blocks()[layer_index].experts
    with torch.no_grad():
        for copy, original in twins.items():
            experts.gate_up_proj[copy] = experts.gate_up_proj[original]
            experts.down_proj[copy] = experts.down_proj[original]
    return model


def calibration_of(model: MoEForCausalLM) -> Calibration:
    windows = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))
    return calibrate(model, windows, sample_tokens=192)


def test_replay_reproduces_the_layer_and_removal_with_redirect(tiny_model: Path) -> None:
    model = model_with_twins(tiny_model, {3: 0})
    layer = calibration_of(model).layers[0]
    block = model.moe_blocks()[0]
    replay = LayerReplay.of(block, layer.inputs)
    x = torch.from_numpy(layer.inputs)
    with torch.no_grad():
        assert torch.allclose(replay.output([]), block(x).float(), atol=1e-5)
    # Redirecting the twin's slots to its original changes nothing; re-picking does change the output.
    assert torch.allclose(replay.output([3], {3: 0}), replay.output([]), atol=1e-6)
    assert redirect_targets(layer.similarity, [3]) == {3: 0}
    (first, free), (_, costly) = removal_path(replay, layer.similarity, 2, "redirect")
    assert first in (0, 3) and free == pytest.approx(0.0, abs=1e-10) and costly > 0  # either twin goes first


def test_duplicates_are_removed_first_and_the_adaptive_budget_follows_cost(tiny_model: Path) -> None:
    model = model_with_twins(tiny_model, {1: 0, 2: 0, 4: 5})
    calibration = calibration_of(model)
    uniform = select(calibration, model, PlanSpec("pes", 0.375, handling="redirect"))  # 3 of 8 experts per layer
    first = model.moe_blocks()[0].layer_idx
    removed = set(uniform.removed[first])
    assert len(removed & {0, 1, 2}) == 2 and len(removed & {4, 5}) == 1  # one of each group of twins survives
    assert all(len(experts) == 3 for experts in uniform.removed.values())
    adaptive = select(calibration, model, PlanSpec("pes", 0.375, budget="adaptive", handling="redirect"))
    # Free removals in the layer with twins come before any costly one elsewhere.
    assert len(adaptive.removed[first]) >= 3
    assert sum(map(len, adaptive.removed.values())) == sum(map(len, uniform.removed.values()))
    assert all(8 - len(experts) >= model.config.top_k for experts in adaptive.removed.values())


def test_budgets_take_the_cheapest_removals_and_refuse_impossible_totals() -> None:
    paths = {0: [(1, 0.1), (2, 0.5)], 2: [(4, 0.2), (6, 0.3)]}
    assert layer_budgets(paths, 3) == {0: 1, 2: 2}
    with pytest.raises(ValueError, match="down to top_k"):
        layer_budgets(paths, 5)


def test_methods_refuse_unknown_names_and_levels(tiny_model: Path) -> None:
    model = load_model(tiny_model, torch.float32, torch.device("cpu")).eval()
    calibration = calibration_of(model)
    with pytest.raises(ValueError, match="unknown pruning method 'magic'"):
        select(calibration, model, PlanSpec("magic", 0.25))
    with pytest.raises(ValueError, match="leaving fewer than top_k"):
        select(calibration, model, PlanSpec("pes", 0.9))
    with pytest.raises(ValueError, match="adaptive budget needs the pes"):
        select(calibration, model, PlanSpec("reap", 0.25, budget="adaptive"))


def test_calibration_round_trips_through_its_file(tiny_model: Path, tmp_path: Path) -> None:
    calibration = calibration_of(load_model(tiny_model, torch.float32, torch.device("cpu")).eval())
    calibration.save(tmp_path / "cal.npz")
    loaded = Calibration.load(tmp_path / "cal.npz")
    for want, got in zip(calibration.layers, loaded.layers, strict=True):
        assert got.layer == want.layer and got.num_tokens == want.num_tokens and got.num_sampled == want.num_sampled
        assert np.array_equal(got.similarity, want.similarity) and np.array_equal(got.inputs, want.inputs)
    (tmp_path / "bad.npz").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="bad.npz: not a calibration file"):
        Calibration.load(tmp_path / "bad.npz")


@pytest.mark.parametrize(("handling", "norm_topk_prob"), [("repick", False), ("repick", True), ("redirect", False)])
def test_fast_paths_are_the_exact_greedy(tiny_model: Path, handling: str, norm_topk_prob: bool) -> None:
    """Each path re-scores only the tokens a removal touches (re-pick also rescales the rest): the same choices
    and errors as recomputing the whole layer for every candidate."""
    model = model_with_twins(tiny_model, {3: 0})
    layer = calibration_of(model).layers[0]
    replay = LayerReplay.of(model.moe_blocks()[0], layer.inputs)
    replay = LayerReplay(replay.logits, replay.outputs, replay.top_k, norm_topk_prob)
    full = replay.output([])
    scale = float(full.pow(2).sum())
    removed: list[int] = []
    for expert, error in removal_path(replay, layer.similarity, 4, handling):
        errors = {}
        for e in (e for e in range(8) if e not in removed):
            redirect = redirect_targets(layer.similarity, removed + [e]) if handling == "redirect" else None
            errors[e] = float((replay.output(removed + [e], redirect) - full).pow(2).sum()) / scale
        assert error == pytest.approx(min(errors.values()), rel=1e-6, abs=1e-9)
        assert errors[expert] == pytest.approx(error, rel=1e-6, abs=1e-9)
        removed.append(expert)


@pytest.mark.parametrize("handling", ["repick", "redirect"])
def test_per_token_errors_weigh_every_token_alike(tiny_model: Path, handling: str) -> None:
    """pes-token's path: each step's error is the mean over tokens of the squared output change relative to the
    token's unpruned output, the smallest of any candidate's."""
    model = model_with_twins(tiny_model, {3: 0})
    layer = calibration_of(model).layers[0]
    replay = LayerReplay.of(model.moe_blocks()[0], layer.inputs)
    full = replay.output([])
    norms = full.pow(2).sum(dim=-1).double()
    removed: list[int] = []
    for expert, error in removal_path(replay, layer.similarity, 4, handling, per_token=True):
        errors = {}
        for e in (e for e in range(8) if e not in removed):
            redirect = redirect_targets(layer.similarity, removed + [e]) if handling == "redirect" else None
            change = (replay.output(removed + [e], redirect) - full).pow(2).sum(dim=-1).double()
            errors[e] = float((change / norms).mean())
        assert error == pytest.approx(min(errors.values()), rel=1e-6, abs=1e-9)
        assert errors[expert] == pytest.approx(error, rel=1e-6, abs=1e-9)
        removed.append(expert)
