"""moe-prune end to end on a tiny checkpoint: analyze writes its map, plan -> apply writes a smaller checkpoint
that transformers loads with the engine's outputs under the plan, and bad input leaves nothing behind."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from pruning.cli import main
from pruning.plan import PruningPlan

FAST = ["--calibration-tokens", "4096", "--sample-tokens", "256", "--seq-len", "128"]


def run(args: list[str], cache: Path) -> None:
    main([*args, *FAST, "--cache-dir", str(cache)] if args[0] != "apply" else args)


def test_analyze_prints_and_writes_the_similarity_map(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(["analyze", str(tiny_model), "-o", str(tmp_path / "out")], tmp_path / "cache")
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert "min PES" in printed and len(result["layers"]) == 3
    assert all(-1 < layer["pes"] < 1 and len(layer["similar_pairs"]) == 5 for layer in result["layers"])
    assert (tmp_path / "out" / "similarity.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((tmp_path / "cache" / "calibration").glob("*.npz"))) == 1  # cached for the next command


def test_applied_checkpoint_loads_in_transformers_with_the_plans_outputs(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    plan_file, out = tmp_path / "plan.json", tmp_path / "pruned"
    run(["plan", str(tiny_model), "--method", "pes", "--level", "0.25", "-o", str(plan_file)], tmp_path / "cache")
    plan = PruningPlan.load(plan_file)
    assert all(len(kept) == 6 for kept in plan.kept.values())  # 8 experts, 25% removed
    run(["apply", str(tiny_model), str(plan_file), "-o", str(out)], tmp_path / "cache")
    config = json.loads((out / "config.json").read_text())
    assert config.get("num_experts", config.get("num_local_experts")) == 6
    assert config["pruning"]["kept_experts"] == {str(k): v for k, v in plan.kept.items()}

    prompt = list(range(20, 44))
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    under_plan = LLM(tiny_model, dtype="float32", routing_policies=plan.routing_policies()).generate([prompt], params)[
        0
    ]
    from_applied = LLM(out, dtype="float32").generate([prompt], params)[0]
    want = torch.tensor([under_plan.prompt_logprobs[i][t].logprob for i, t in enumerate(prompt) if i > 0])
    got = torch.tensor([from_applied.prompt_logprobs[i][t].logprob for i, t in enumerate(prompt) if i > 0])
    assert torch.allclose(got, want, atol=1e-5)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    reference = logprobs[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    assert torch.allclose(reference, want, atol=1e-4)


def test_apply_refuses_what_a_config_cannot_express_and_writes_nothing(tiny_model: Path, tmp_path: Path) -> None:
    plan_file, out = tmp_path / "plan.json", tmp_path / "pruned"
    run(
        ["plan", str(tiny_model), "--level", "0.25", "--handling", "redirect", "-o", str(plan_file)], tmp_path / "cache"
    )
    with pytest.raises(SystemExit) as exit_info:
        run(["apply", str(tiny_model), str(plan_file), "-o", str(out)], tmp_path / "cache")
    assert exit_info.value.code == 1 and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned")]


def test_plan_refuses_impossible_levels(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run(["plan", str(tiny_model), "--level", "0.9", "-o", str(tmp_path / "p.json")], tmp_path / "cache")
    assert "leaving fewer than top_k=2" in capsys.readouterr().err and not (tmp_path / "p.json").exists()


def test_eval_writes_tables_and_plots_with_finite_perplexity(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    args = ["eval", str(tiny_model), "--methods", "pes,reap,random", "--levels", "0,0.25", "--test-tokens", "1024"]
    run([*args, "--thresholds", "0,0.3", "--dropped-top", "0,1", "-o", str(out)], tmp_path / "cache")
    results = json.loads((out / "results.json").read_text())[tiny_model.name]
    assert [row["variant"] for row in results["pruning"]] == ["none", "pes", "reap", "random"]
    assert all(math.isfinite(row["ppl"]) and row["tokens"] == 1024 for row in results["pruning"])
    assert results["thresholds"][1]["experts_per_token"] < results["thresholds"][0]["experts_per_token"] == 2
    assert results["dropped_top"][1]["loss"] != results["dropped_top"][0]["loss"]  # a random model: no direction
    assert "| pes |" in (out / "results.md").read_text()
    for png in ("levels.png", "thresholds.png", "dropped_top.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
