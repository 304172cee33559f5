"""Plans: made from a real calibration, round-trip through JSON, refuse the wrong model and bad files, and at
level 0 leave the engine's output unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.checkpoint import load_model
from pruning.calibration import calibrate
from pruning.plan import PlanError, PruningPlan, make_plan
from pruning.spec import PlanSpec
from tests.conftest import copy_checkpoint


def plan_for(model_dir: Path, method: str, level: float, **options: str) -> PruningPlan:
    model = load_model(model_dir, torch.float32, torch.device("cpu")).eval()
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    return make_plan(model_dir, model, calibrate(model, windows, sample_tokens=32), PlanSpec(method, level, **options))


def test_plans_round_trip_and_keep_at_least_top_k(tiny_model: Path, tmp_path: Path) -> None:
    plan = plan_for(tiny_model, "frequency", 0.5)
    assert plan.num_experts == load_model(tiny_model, torch.float32, torch.device("cpu")).config.num_experts
    assert all(len(kept) == plan.num_experts // 2 >= plan.top_k for kept in plan.kept.values())
    plan.save(tmp_path / "plan.json")
    assert PruningPlan.load(tmp_path / "plan.json") == plan
    plan.check_model(tiny_model)


def test_level_zero_is_the_identity(tiny_model: Path) -> None:
    plan = plan_for(tiny_model, "reap", 0.0)
    llm = LLM(tiny_model, max_num_seqs=4, kv_cache_memory_bytes=16 << 20)
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=2, ignore_eos=True)
    before = llm.generate(["a plan at level zero"], params)[0].outputs[0]
    llm.set_routing_policies(plan.routing_policies())
    after = llm.generate(["a plan at level zero"], params)[0].outputs[0]
    assert after.token_ids == before.token_ids and after.logprobs == before.logprobs


def test_wrong_model_and_bad_files_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    plan = plan_for(tiny_model, "random", 0.25)
    other = copy_checkpoint(tiny_model, tmp_path / "other")
    weights = next(other.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\1")
    with pytest.raises(PlanError, match="does not fit"):
        plan.check_model(other)
    (tmp_path / "bad.json").write_text('{"format": 1, "model_name": "x"}')
    with pytest.raises(PlanError, match="field 'model_sha256' is missing"):
        PruningPlan.load(tmp_path / "bad.json")
    with pytest.raises(PlanError, match="fewer than top_k"):
        PruningPlan("m", "0" * 64, "frequency", 0.9, 8, 2, kept={0: [1]})
    with pytest.raises(PlanError, match="does not exist"):
        PruningPlan.load(tmp_path / "missing.json")


def test_removed_lists_each_layers_experts_that_are_not_kept() -> None:
    plan = PruningPlan("m", "0" * 64, "frequency", 0.5, 8, 2, kept={0: [1, 4, 6, 7], 2: [0, 1, 2, 3]})
    assert plan.removed() == {0: [0, 2, 3, 5], 2: [4, 5, 6, 7]}
