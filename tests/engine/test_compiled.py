"""The compiled forward against the eager reference: the same greedy tokens and logprobs within 1e-5 (fp32) on
every architecture, under continuous batching with adds, aborts and preemption, at batch sizes from 1 up;
routing changes at run time are served under the new routing, never the old; and bf16 serving with the dense
projection kernel scores as fp32 eager within bf16 rounding."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from engine import RoutingPolicy, SamplingParams
from engine.config import ModelConfig
from engine.cpu_kernels import kernels
from engine.llm_engine import EngineConfig, LLMEngine
from engine.native_ops import native_ops
from engine.outputs import RequestOutput
from engine.projections import kernel_rows
from engine.token_routing import TokenRouting
from tests.conftest import ARCHS

pytestmark = pytest.mark.slow  # compiles every architecture

TOLERANCE = 1e-5


def engines(path: Path, **config: object) -> tuple[LLMEngine, LLMEngine]:
    """An eager and a compiled engine on the same checkpoint, fp32 on CPU."""
    base = {"dtype": "float32", "device": "cpu", "max_model_len": 256, **config}
    eager = LLMEngine(path, EngineConfig(enforce_eager=True, **base))  # type: ignore[arg-type]
    compiled = LLMEngine(path, EngineConfig(enforce_eager=False, **base))  # type: ignore[arg-type]
    compiled.warm_up()
    return eager, compiled


def scripted_run(engine: LLMEngine) -> tuple[dict[str, RequestOutput], list[int]]:
    """Requests arriving while others run, one aborted, one scoring its prompt; returns the finished outputs and
    the batch size of every step."""
    generator = torch.Generator().manual_seed(3)

    def prompt(n: int) -> list[int]:
        return torch.randint(0, 250, (n,), generator=generator).tolist()

    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2)
    arrivals = {
        0: [("a", prompt(9), greedy)],
        2: [
            ("b", prompt(23), greedy),
            ("c", prompt(5), SamplingParams(temperature=0.0, max_tokens=12, prompt_logprobs=1)),
        ],
        5: [(f"d{i}", prompt(11 + 7 * i), greedy) for i in range(5)],
        9: [("e", prompt(40), SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, n=2, logprobs=0))],
    }
    finished: dict[str, RequestOutput] = {}
    sizes = []
    step = 0
    while step in arrivals or engine.has_unfinished_requests() or step < max(arrivals):
        for request_id, tokens, params in arrivals.get(step, []):
            engine.add_request(request_id, tokens, params)
        if step == 12:
            engine.abort_request("d1")
        sizes.append(engine.last_step.num_tokens)
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
        step += 1
    return finished, sizes


def assert_same(eager: RequestOutput, compiled: RequestOutput) -> None:
    for a, b in zip(eager.outputs, compiled.outputs, strict=True):
        assert a.token_ids == b.token_ids
        assert a.finish_reason == b.finish_reason
        for entry_a, entry_b in zip(a.logprobs or [], b.logprobs or [], strict=True):
            assert entry_a.keys() == entry_b.keys()
            assert all(abs(entry_a[t].logprob - entry_b[t].logprob) < TOLERANCE for t in entry_a)
    for entry_a, entry_b in zip(eager.prompt_logprobs or [], compiled.prompt_logprobs or [], strict=True):
        if entry_a is not None:
            assert entry_b is not None and all(
                abs(entry_a[t].logprob - entry_b[t].logprob) < TOLERANCE for t in entry_a
            )


def kv_bytes(path: Path, blocks: int) -> int:
    """A KV cache budget of `blocks` blocks of 16 tokens, fp32."""
    config = ModelConfig.from_dir(path)
    return blocks * 2 * config.num_layers * 16 * config.num_kv_heads * config.head_dim * 4


def generate(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list[RequestOutput]:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"g{i}", prompt, params)
    finished: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    return [finished[f"g{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_matches_eager_under_continuous_batching(arch: str, hf_checkpoint: Callable[[str], Path]) -> None:
    path = hf_checkpoint(arch)
    # A cache of 12 blocks cannot hold every request at once: some are preempted and recomputed.
    eager, compiled = engines(path, max_model_len=128, max_num_seqs=8, kv_cache_memory_bytes=kv_bytes(path, 12))
    expected, _ = scripted_run(eager)
    got, sizes = scripted_run(compiled)
    assert set(expected) == set(got) == {"a", "b", "c", "d0", "d2", "d3", "d4", "e"}
    for request_id in expected:
        assert_same(expected[request_id], got[request_id])
    assert eager.scheduler.num_preemptions > 0 and compiled.scheduler.num_preemptions == eager.scheduler.num_preemptions
    assert {1, 3}.issubset(set(sizes)) and max(sizes) > 8  # one-token steps, small batches, prefill-sized steps
    assert (eager.expert_load() == compiled.expert_load()).all()  # the counters run inside the compiled graph
    assert compiled.runner.forward.direct_kinds == {True, False}  # both graphs ran without dynamo's frame hook
    assert compiled.runner.forward.inner_kinds == {True}  # and the one-token graph without AOT's wrappers


def test_routing_changes_at_run_time_are_served_by_the_new_routing(tiny_model: Path) -> None:
    eager, compiled = engines(tiny_model, max_num_seqs=4, kv_cache_memory_bytes=16 << 20)
    prompts = [[5, 9, 13, 2, 40, 41], [7, 7, 1]]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
    num_experts = compiled.model.config.num_experts
    kept = torch.ones(num_experts, dtype=torch.bool)
    kept[: num_experts // 2] = False
    pruned = {block.layer_idx: RoutingPolicy(kept_experts=kept, top_k=1) for block in compiled.model.moe_blocks()}
    before = generate(compiled, prompts, params)
    outputs = {}
    for name, policies in (("pruned", pruned), ("default", {})):
        eager.set_routing_policies(policies)
        compiled.set_routing_policies(policies)
        outputs[name] = generate(compiled, prompts, params)
        for a, b in zip(generate(eager, prompts, params), outputs[name], strict=True):
            assert_same(a, b)
    tokens = {name: [o.outputs[0].token_ids for o in out] for name, out in outputs.items()}
    assert tokens["pruned"] != tokens["default"]  # the change took effect ...
    assert tokens["default"] == [o.outputs[0].token_ids for o in before]  # ... and was undone


def test_per_request_budgets_and_substitution_are_data_not_recompiles(tiny_model: Path) -> None:
    """Requests at different budgets in one batch match eager, and changing budgets compiles nothing new."""
    eager, compiled = engines(tiny_model, max_num_seqs=4, kv_cache_memory_bytes=16 << 20)
    for engine in (eager, compiled):
        policies = {}
        for block in engine.model.moe_blocks():
            flat = torch.nn.functional.normalize(block.experts.gate_up_proj.flatten(1).float(), dim=1)
            policies[block.layer_idx] = RoutingPolicy(similarity=flat @ flat.T)
        engine.set_routing_policies(policies)
    prompts = [[5, 9, 13, 2, 40, 41], [7, 7, 1], [3, 1, 4, 1, 5, 9, 2, 6]]

    def run(engine: LLMEngine, budgets: list[TokenRouting | None]) -> list[RequestOutput]:
        for i, (prompt, routing) in enumerate(zip(prompts, budgets, strict=True)):
            params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=1, routing=routing)
            engine.add_request(f"r{i}", prompt, params)
        finished: dict[str, RequestOutput] = {}
        while engine.has_unfinished_requests():
            finished.update((o.request_id, o) for o in engine.step() if o.finished)
        return [finished[f"r{i}"] for i in range(len(prompts))]

    mixes = [
        [TokenRouting(experts_per_token=2), TokenRouting(keep_top=1, min_similarity=0.0), None],
        [TokenRouting(min_prob=0.2), None, TokenRouting(keep_top=1, min_similarity=-1.0)],
    ]
    run(compiled, mixes[0])  # compiles the graphs for this routing
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for budgets in mixes:
        for a, b in zip(run(eager, budgets), run(compiled, budgets), strict=True):
            assert_same(a, b)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


@pytest.mark.skipif(kernels() is None, reason="no C compiler: the CPU kernels cannot be built")
def test_compiled_bf16_with_the_projection_kernel_scores_as_fp32_eager(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 serving runs the dense projections and the routers' gates through the CPU kernel inside the compiled
    graphs (up to kernel_rows(): decode batches, and prefills too on AMX) and torch's linear above, so both graphs
    hold no prepacked (mkldnn) weight and inductor's FX graph cache stores them for a restart; teacher-forced
    logprobs stay within bf16 rounding of fp32 eager. A routing change then compiles graphs of its own, and changing
    back loads the first ones from the cache, which serve the first routing again."""
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 250, (n,), generator=generator).tolist() for n in (5, 9, 80, 12)]
    forced = torch.randint(0, 250, (10,), generator=generator).tolist()
    params = SamplingParams(max_tokens=10, forced_tokens=forced, logprobs=0, prompt_logprobs=0)
    eager = LLMEngine(tiny_model, EngineConfig(dtype="float32", device="cpu", max_model_len=128))
    compiled = LLMEngine(
        tiny_model, EngineConfig(dtype="bfloat16", device="cpu", max_model_len=128, enforce_eager=False)
    )
    cache = dict(counters["inductor"])
    compiled.warm_up()
    stored = {k: counters["inductor"][k] - cache.get(k, 0) for k in ("fxgraph_cache_miss", "fxgraph_cache_hit")}
    assert counters["inductor"]["fxgraph_cache_bypass"] == cache.get("fxgraph_cache_bypass", 0)
    assert sum(stored.values()) == 2  # the one-token and the many-token graph, compiled and stored, or found
    cpu, calls, native = kernels(), [], native_ops()
    linears = cpu.linears
    monkeypatch.setattr(cpu, "linears", lambda *args: calls.append(args[0].shape[0]) or linears(*args))
    before = native.served()["dense_linears"] if native is not None else 0
    expected, got = generate(eager, prompts, params), generate(compiled, prompts, params)
    assert all(rows <= kernel_rows() for rows in calls)
    if native is not None:  # the C++ op called the kernel: once per layer's q/k/v, o and dense MLP per step
        assert native.served()["dense_linears"] - before >= 10 * ModelConfig.from_dir(tiny_model).num_layers
    else:
        assert 4 in calls  # decode batches of 4 through the kernel
    differences = []
    for a, b in zip(expected, got, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids == forced
        for entry_a, entry_b, token in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, forced, strict=True):
            differences.append(abs(entry_a[token].logprob - entry_b[token].logprob))
        for entry_a, entry_b in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
            differences.extend(abs(entry_a[t].logprob - entry_b[t].logprob) for t in entry_a)
    # bf16 rounding, and the odd token whose routing it flips (bf16 eager measures the same against fp32)
    spread = torch.tensor(differences).quantile(torch.tensor([0.5, 0.9])).tolist()
    assert spread[0] < 0.03 and spread[1] < 0.15, spread

    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    num_experts = compiled.model.config.num_experts
    kept = torch.arange(num_experts) >= num_experts // 2
    pruned = {block.layer_idx: RoutingPolicy(kept_experts=kept, top_k=1) for block in compiled.model.moe_blocks()}
    tokens = {}
    for name, policies in (("default", {}), ("pruned", pruned), ("default again", {})):
        compiled.set_routing_policies(policies)
        hits = counters["inductor"]["fxgraph_cache_hit"]
        compiled.warm_up()  # compiles (or loads) both graphs
        tokens[name] = [o.outputs[0].token_ids for o in generate(compiled, prompts[:2], greedy)]
    assert counters["inductor"]["fxgraph_cache_hit"] - hits == 2  # both graphs of the default routing, from the cache
    assert tokens["pruned"] != tokens["default"] and tokens["default again"] == tokens["default"]
