"""Live pruning (engine/expert_tables.py): a plan switched in while serving routes exactly as the same plan
installed at start (whose experts' weights are released), compiled or eager, without recompiling; a switch
reaches requests in flight from the next step; cached prefixes never leak across a switch; a bad switch is
refused naming the layer and changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import RoutingPolicy, SamplingParams
from engine.config import CheckpointError
from engine.llm_engine import EngineConfig, LLMEngine
from engine.outputs import RequestOutput
from tests.conftest import copy_checkpoint
from tests.engine.test_compiled import assert_same, generate

BASE = {"dtype": "float32", "device": "cpu", "max_model_len": 128, "max_num_seqs": 4, "kv_cache_memory_bytes": 16 << 20}
PROMPTS = [[5, 9, 13, 2, 40, 41], [7, 7, 1], list(range(30, 50))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=1)


def plans(engine: LLMEngine) -> dict[str, dict[int, RoutingPolicy]]:
    """Half the experts removed (re-picked among survivors), and the same half redirected to a survivor."""
    num_experts = engine.model.config.num_experts
    kept = torch.ones(num_experts, dtype=torch.bool)
    kept[1::2] = False
    redirect = torch.arange(num_experts)
    redirect[1::2] = torch.arange(0, num_experts - 1, 2)
    layers = [block.layer_idx for block in engine.model.moe_blocks()]
    return {
        "repick": {layer: RoutingPolicy(kept_experts=kept) for layer in layers},
        "redirect": {layer: RoutingPolicy(redirect=redirect) for layer in layers},
    }


@pytest.mark.parametrize(
    "enforce_eager", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["eager", "compiled"]
)
def test_a_live_plan_routes_as_the_same_plan_installed_at_start(tiny_model: Path, enforce_eager: bool) -> None:
    live = LLMEngine(tiny_model, EngineConfig(enforce_eager=enforce_eager, live_pruning=True, **BASE))  # type: ignore[arg-type]
    live.warm_up()
    unpruned = generate(live, PROMPTS, GREEDY)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for name, policies in plans(live).items():
        static = LLMEngine(tiny_model, EngineConfig(enforce_eager=True, routing_policies=policies, **BASE))  # type: ignore[arg-type]
        assert static.released_expert_bytes > 0
        live.set_live_pruning(policies)
        live.reset_expert_load()
        pruned = generate(live, PROMPTS, GREEDY)
        for a, b in zip(generate(static, PROMPTS, GREEDY), pruned, strict=True):
            assert_same(a, b)
        assert [o.outputs[0].token_ids for o in pruned] != [o.outputs[0].token_ids for o in unpruned], name
        assert live.expert_load()[live.model.moe_blocks()[0].layer_idx, 1::2].sum() == 0  # removed: never routed
    live.set_live_pruning({})
    for a, b in zip(unpruned, generate(live, PROMPTS, GREEDY), strict=True):
        assert_same(a, b)  # switched back: the weights were never released
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # tables are data: nothing recompiled


def test_a_switch_reaches_requests_in_flight_and_no_cached_prefix_crosses_it(tiny_model: Path) -> None:
    engine = LLMEngine(tiny_model, EngineConfig(enforce_eager=True, live_pruning=True, **BASE))  # type: ignore[arg-type]
    repick = plans(engine)["repick"]
    prompt = list(range(10, 43))  # two full blocks to share

    def run(switch_at: int) -> RequestOutput:
        engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0))
        finished, step = [], 0
        while engine.has_unfinished_requests():
            if step == switch_at:
                engine.set_live_pruning(repick)
            finished += [o for o in engine.step() if o.finished]
            step += 1
        engine.set_live_pruning({})
        return finished[0]

    plain, switched = run(-1), run(5)
    values = lambda o: [next(iter(entry.values())).logprob for entry in o.outputs[0].logprobs]
    assert values(switched)[:5] == pytest.approx(values(plain)[:5], abs=1e-6)  # steps before the switch
    assert values(switched)[5:] != pytest.approx(values(plain)[5:], abs=1e-3)  # pruned from the next step on
    engine.set_live_pruning(repick)
    fresh = LLMEngine(tiny_model, EngineConfig(enforce_eager=True, routing_policies=repick, **BASE))  # type: ignore[arg-type]
    [again] = generate(engine, [prompt], GREEDY)  # the prompt's blocks were cached unpruned before the switch
    [expected] = generate(fresh, [prompt], GREEDY)
    assert_same(expected, again)


def test_a_bad_switch_names_the_layer_and_changes_nothing(tiny_model: Path) -> None:
    engine = LLMEngine(tiny_model, EngineConfig(enforce_eager=True, live_pruning=True, **BASE))  # type: ignore[arg-type]
    before = generate(engine, PROMPTS[:1], GREEDY)
    layer = engine.model.moe_blocks()[0].layer_idx
    num_experts = engine.model.config.num_experts
    too_few = torch.zeros(num_experts, dtype=torch.bool)
    too_few[0] = True
    bad = {
        "keep at least top_k": {layer: RoutingPolicy(kept_experts=too_few)},
        "switches kept_experts and redirect only": {layer: RoutingPolicy(top_k=1)},
        "expert ids in": {layer: RoutingPolicy(redirect=torch.full((num_experts,), num_experts))},
        "have no MoE block": {999: RoutingPolicy()},
    }
    for message, policies in bad.items():
        with pytest.raises(ValueError, match=message):
            engine.set_live_pruning(policies)
    for a, b in zip(before, generate(engine, PROMPTS[:1], GREEDY), strict=True):
        assert_same(a, b)
    plain = LLMEngine(tiny_model, EngineConfig(enforce_eager=True, **BASE))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="live pruning is off"):
        plain.set_live_pruning({})


@pytest.mark.parametrize(
    "enforce_eager", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["eager", "compiled"]
)
def test_live_pruning_can_release_experts_and_read_them_back_from_the_checkpoint(
    tiny_model: Path, enforce_eager: bool
) -> None:
    config = EngineConfig(enforce_eager=enforce_eager, live_pruning=True, live_pruning_releases_experts=True, **BASE)  # type: ignore[arg-type]
    live = LLMEngine(tiny_model, config)
    live.warm_up()
    full_bytes, unpruned = live.weight_bytes, generate(live, PROMPTS, GREEDY)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for policies in plans(live).values():
        static = LLMEngine(tiny_model, EngineConfig(enforce_eager=True, routing_policies=policies, **BASE))  # type: ignore[arg-type]
        live.set_live_pruning(policies)
        assert live.weight_bytes == static.weight_bytes < full_bytes  # memory follows the pruning
        assert live.released_expert_bytes == static.released_expert_bytes == full_bytes - live.weight_bytes
        for a, b in zip(generate(static, PROMPTS, GREEDY), generate(live, PROMPTS, GREEDY), strict=True):
            assert_same(a, b)
        live.set_live_pruning({})
        assert live.weight_bytes == full_bytes and live.released_expert_bytes == 0
        for a, b in zip(unpruned, generate(live, PROMPTS, GREEDY), strict=True):
            assert_same(a, b)  # the rows read back serve exactly as the ones loaded at start
    if not enforce_eager:  # the compiled step reads expert weights from the forward context: nothing recompiled
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_a_release_whose_rows_cannot_be_read_back_changes_nothing(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_checkpoint(tiny_model, tmp_path / "model")
    config = EngineConfig(enforce_eager=True, live_pruning=True, live_pruning_releases_experts=True, **BASE)  # type: ignore[arg-type]
    engine = LLMEngine(model, config)
    repick = plans(engine)["repick"]
    engine.set_live_pruning(repick)
    pruned, held = generate(engine, PROMPTS, GREEDY), engine.weight_bytes
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # the checkpoint changed on disk
    with pytest.raises(CheckpointError, match="model.safetensors"):
        engine.set_live_pruning({})
    assert engine.weight_bytes == held
    for a, b in zip(pruned, generate(engine, PROMPTS, GREEDY), strict=True):
        assert_same(a, b)  # still the pruned plan, on the weights it held
