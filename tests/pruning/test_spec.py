"""A plan's settings are one checked value whose key names its cached file exactly as before (plans users cached
stay found), and the method table is the one place a method is added."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_model
from pruning.cache import plan_file
from pruning.calibration import Calibration, calibrate
from pruning.choices import BUDGETS
from pruning.cli import build_parser
from pruning.methods import METHODS, Method, MethodOptions
from pruning.plan import PlanError, make_plan, weights_sha256
from pruning.settings import PruningSettings
from pruning.spec import CalibrationSpec, PlanSpec
from server.cli import parse_args

SHA = "ab" * 32


def earlier_key(
    model_sha256: str, method: str, level: float, budget: str, handling: str, seed: int, **spec: object
) -> str:
    """The plan cache's key as releases before PlanSpec computed it: a SHA-256 of the JSON of the settings and of
    the calibration spec's fields (defaults filled in), its first 24 hex digits."""
    calibration = {"split": "validation", "files": (), "max_tokens": 262144, "seq_len": 512, "sample_tokens": 16384}
    parts = (model_sha256, method, level, budget, handling, seed, {**calibration, **spec})
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def test_the_key_of_a_plan_is_the_one_cached_plans_were_filed_under(tiny_model: Path, tmp_path: Path) -> None:
    default = PlanSpec("pes", 0.25)
    files = CalibrationSpec(files=(Path("traffic/a.txt"),), max_tokens=8192, sample_tokens=256)
    tuned = PlanSpec("pes", 0.5, "adaptive", "redirect", 3, files)
    assert default.key(SHA) == earlier_key(SHA, "pes", 0.25, "uniform", "repick", 0) == "41921f0c5311ca5f32a1d914"
    assert tuned.key(SHA) == "39a67db931c5b133fe37e6a6"
    assert tuned.key(SHA) == earlier_key(
        SHA, "pes", 0.5, "adaptive", "redirect", 3, files=["traffic/a.txt"], max_tokens=8192, sample_tokens=256
    )
    assert PlanSpec("frequency", 0.25).key(SHA) == "a5169abef3af46a0a72b03e1"
    cached = plan_file(tiny_model, default, tmp_path)
    assert cached == tmp_path / "plans" / f"{default.key(weights_sha256(tiny_model))}.json"


def test_plan_specs_refuse_what_no_method_can_make() -> None:
    with pytest.raises(ValueError, match="unknown pruning method 'magic'; expected one of pes, frequency, reap"):
        PlanSpec("magic", 0.25)
    with pytest.raises(ValueError, match="budget must be one of"):
        PlanSpec("pes", 0.25, budget="greedy")
    with pytest.raises(ValueError, match="handling one of"):
        PlanSpec("pes", 0.25, handling="drop")
    with pytest.raises(ValueError, match="adaptive budget needs the pes method's costs; 'random'"):
        PlanSpec("random", 0.25, budget="adaptive")
    for level in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"pruning level must be in \[0, 1\)"):
            PlanSpec("reap", level)
    assert PlanSpec("pes", 0.25) == PlanSpec("pes", 0.25, calibration=CalibrationSpec())  # a value, hashable
    assert len({PlanSpec("pes", 0.25), PlanSpec("pes", 0.25)}) == 1


def test_command_lines_offer_the_method_table_and_list_it_without_torch() -> None:
    assert set().union(*(method.budgets for method in METHODS.values())) <= set(BUDGETS)
    plan = ["plan", "model", "--level", "0.25", "-o", "plan.json", "--method"]
    for name in METHODS:
        assert build_parser().parse_args([*plan, name]).method == parse_args(["--prune-method", name]).prune_method
    for refused in (lambda: build_parser().parse_args([*plan, "magic"]), lambda: parse_args(["--prune-method", "x"])):
        with pytest.raises(SystemExit):
            refused()
    probe = "import sys, pruning.methods, pruning.spec; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "False"


def test_a_method_is_one_entry_in_the_table(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def lowest_ids(calibration: Calibration, model: object, count: int, options: MethodOptions) -> dict[int, list[int]]:
        return {layer.layer: list(range(count)) for layer in calibration.layers}

    monkeypatch.setitem(METHODS, "lowest-ids", Method(lowest_ids))
    model = load_model(tiny_model, torch.float32, torch.device("cpu")).eval()
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    plan = make_plan(tiny_model, model, calibrate(model, windows, sample_tokens=16), PlanSpec("lowest-ids", 0.25))
    removed = round(0.25 * plan.num_experts)
    assert plan.method == "lowest-ids"
    assert all(kept == list(range(removed, plan.num_experts)) for kept in plan.kept.values())
    with pytest.raises(ValueError, match="adaptive budget needs the pes method's costs"):
        PlanSpec("lowest-ids", 0.25, budget="adaptive")


def test_server_settings_make_one_plan_spec_and_refuse_a_contradictory_one() -> None:
    settings = PruningSettings(level=0.25, method="frequency", calibration_tokens=4096)
    assert settings.plan_spec() == PlanSpec("frequency", 0.25, calibration=CalibrationSpec(max_tokens=4096))
    with pytest.raises(PlanError, match="adaptive budget needs the pes method's costs"):
        PruningSettings(level=0.25, method="reap", budget="adaptive")
