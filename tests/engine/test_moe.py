"""Expert dispatch backends, the routing seam's policies and routed-token statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, RoutingPolicy, SamplingParams
from engine.moe import ExpertLoad, SparseMoE, dispatch, select_backend
from engine.routing import Routing, route

E, K, H, I = 8, 2, 32, 16


def moe_block(seed: int = 0) -> SparseMoE:
    torch.manual_seed(seed)
    block = SparseMoE(0, H, E, K, I, norm_topk_prob=True)
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.3)
    return block


def test_grouped_and_loop_backends_agree_exactly() -> None:
    block = moe_block()
    x = torch.randn(13, H)
    # Experts 0-2 get every slot, 3-7 get none; token 12 alone owns expert 7 in the second routing.
    crowded = Routing(torch.randint(0, 3, (13, K)), torch.rand(13, K))
    sparse_ids = torch.randint(0, 3, (13, K))
    sparse_ids[12, 0] = 7
    lonely = Routing(sparse_ids, torch.rand(13, K))
    for routing in (crowded, lonely):
        grouped = dispatch(x, routing, block.experts, "grouped")
        loop = dispatch(x, routing, block.experts, "loop")
        assert torch.equal(grouped, loop)


def test_single_token_and_dropped_slots() -> None:
    block = moe_block()
    x = torch.randn(1, H)
    routing = Routing(torch.tensor([[5, E]]), torch.tensor([[0.7, 0.0]]))
    out = dispatch(x, routing, block.experts, "grouped")
    assert torch.equal(out, dispatch(x, routing, block.experts, "loop"))
    gate, up = (x @ block.experts.gate_up_proj[5].T).chunk(2, dim=-1)
    expected = 0.7 * ((torch.nn.functional.silu(gate) * up) @ block.experts.down_proj[5].T)
    torch.testing.assert_close(out, expected)


def test_dispatch_matches_dense_reference() -> None:
    block = moe_block()
    x = torch.randn(9, H)
    routing = route(block.gate(x), K, True)
    expected = torch.zeros(9, H)
    for t in range(9):
        for slot in range(K):
            e = int(routing.expert_ids[t, slot])
            gate, up = (x[t] @ block.experts.gate_up_proj[e].T).chunk(2)
            expected[t] += routing.weights[t, slot] * (
                (torch.nn.functional.silu(gate) * up) @ block.experts.down_proj[e].T
            )
    torch.testing.assert_close(dispatch(x, routing, block.experts, "grouped"), expected, rtol=1e-5, atol=1e-5)


def test_unaligned_sizes_fall_back_to_loop(caplog: pytest.LogCaptureFixture) -> None:
    assert select_backend("grouped", 64, 32, torch.float32) == "grouped"
    with caplog.at_level("WARNING"):
        assert select_backend("grouped", 63, 32, torch.float32) == "loop"
    assert len(caplog.records) == 1 and "grouped_mm cannot run" in caplog.records[0].message
    with pytest.raises(ValueError, match="unknown MoE backend"):
        select_backend("triton", 64, 32, torch.float32)


def test_policy_mask_repicks_among_survivors() -> None:
    logits = torch.randn(50, E)
    kept = torch.ones(E, dtype=torch.bool)
    kept[[1, 4, 6]] = False
    routing = route(logits, K, True, RoutingPolicy(kept_experts=kept))
    assert not torch.isin(routing.expert_ids, torch.tensor([1, 4, 6])).any()
    reference = route(logits[:, kept], K, True)
    survivors = torch.nonzero(kept).squeeze(-1)
    assert torch.equal(routing.expert_ids, survivors[reference.expert_ids])
    torch.testing.assert_close(routing.weights, reference.weights)


def test_policy_redirect_moves_slots_and_keeps_weights() -> None:
    logits = torch.randn(50, E)
    redirect = torch.arange(E)
    redirect[3] = 0
    plain = route(logits, K, False)
    routing = route(logits, K, False, RoutingPolicy(redirect=redirect))
    assert not (routing.expert_ids == 3).any()
    assert torch.equal(routing.expert_ids, torch.where(plain.expert_ids == 3, 0, plain.expert_ids))
    assert torch.equal(routing.weights, plain.weights)


def test_policy_top_k_override_and_threshold() -> None:
    logits = torch.randn(50, E) * 3
    wider = route(logits, K, False, RoutingPolicy(top_k=4))
    assert wider.expert_ids.shape == (50, 4)
    tau = 0.2
    routing = route(logits, K, False, RoutingPolicy(min_prob=tau))
    probs = torch.softmax(logits, dim=-1)
    plain = route(logits, K, False)
    below = torch.gather(probs, 1, plain.expert_ids) < tau
    assert below.any() and (~below).any()
    assert torch.equal(routing.expert_ids == E, below)
    assert (routing.weights[below] == 0).all()
    assert torch.equal(routing.weights[~below], plain.weights[~below])


def test_policy_skip_top_picks_the_next_best_experts() -> None:
    logits = torch.randn(50, E) * 3
    ranked = torch.argsort(torch.softmax(logits, dim=-1), dim=-1, descending=True)
    routing = route(logits, K, False, RoutingPolicy(skip_top=2))
    assert torch.equal(routing.expert_ids, ranked[:, 2 : 2 + K])
    assert torch.allclose(routing.weights, torch.gather(torch.softmax(logits, dim=-1), 1, ranked[:, 2 : 2 + K]))
    with pytest.raises(ValueError, match="skip_top must leave top_k"):
        RoutingPolicy(skip_top=E - 1).validate(E, K)


def test_policy_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="at least top_k"):
        RoutingPolicy(kept_experts=torch.tensor([True] + [False] * (E - 1))).validate(E, K)
    with pytest.raises(ValueError, match="redirect targets"):
        RoutingPolicy(redirect=torch.full((E,), E)).validate(E, K)
    with pytest.raises(ValueError, match="min_prob"):
        RoutingPolicy(min_prob=1.5).validate(E, K)


def test_expert_load_counts_routed_pairs() -> None:
    load = ExpertLoad(num_layers=2, num_experts=E)
    load.record(1, torch.tensor([[0, 3], [3, E]]))
    snapshot = load.snapshot()
    assert snapshot.shape == (2, E)
    assert snapshot[1].tolist() == [1, 0, 0, 2, 0, 0, 0, 0] and snapshot[0].sum() == 0
    load.reset()
    assert load.snapshot().sum() == 0 and snapshot.sum() == 3  # a snapshot is a copy, not a live view
    load.record(0, torch.tensor([[0, 3], [3, 5]]), token_mask=torch.tensor([0, 1]))
    assert load.snapshot()[0].tolist() == [0, 0, 0, 1, 0, 1, 0, 0]


def test_llm_expert_load_and_policies(tiny_model: Path) -> None:
    # Without prefix caching every run routes its whole prompt, which the counts below rely on.
    llm = LLM(tiny_model, dtype="float32", device="cpu", max_model_len=64, enable_prefix_caching=False)
    prompt = list(range(10, 30))
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    baseline = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    load = llm.expert_load()
    config = llm.engine.model.config
    assert load.shape == (config.num_layers, config.num_experts)
    # Every token computed (20 prompt + 4 fed back; the 5th is never fed) routes top_k slots in every layer.
    assert (load.sum(axis=1) == (len(prompt) + 4) * config.top_k).all()
    llm.reset_expert_load()
    kept = torch.ones(config.num_experts, dtype=torch.bool)
    kept[:4] = False
    llm.set_routing_policies({layer: RoutingPolicy(kept_experts=kept) for layer in range(config.num_layers)})
    llm.generate([prompt], params, use_tqdm=False)
    assert llm.expert_load()[:, :4].sum() == 0 and llm.expert_load().sum() > 0
    llm.set_routing_policies({})
    assert llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == baseline
    llm.reset_expert_load()
    llm.set_routing_policies({})
    llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    # The prompt is counted once for the request, each completion's fed-back tokens once each.
    assert (llm.expert_load().sum(axis=1) == (len(prompt) + 3 * 4) * config.top_k).all()
    with pytest.raises(ValueError, match="no MoE block"):
        llm.set_routing_policies({99: RoutingPolicy()})


@pytest.mark.parametrize("by", ["mask", "redirect"])
def test_released_experts_free_memory_and_route_as_the_policy_does(tiny_model: Path, by: str) -> None:
    """Releasing the experts a policy cannot reach changes no logprob, frees their bytes, keeps original ids."""
    args = {"dtype": "float32", "device": "cpu", "max_model_len": 64, "enable_prefix_caching": False}
    config = LLM(tiny_model, **args).engine.model.config
    removed = [1, 2, 5]
    if by == "mask":
        kept = torch.ones(config.num_experts, dtype=torch.bool)
        kept[removed] = False
        policy = RoutingPolicy(kept_experts=kept)
    else:
        table = torch.arange(config.num_experts)
        table[removed] = 0
        policy = RoutingPolicy(redirect=table)
    policies = {layer: policy for layer in range(config.num_layers) if config.is_moe_layer(layer)}
    masked = LLM(tiny_model, routing_policies=policies, release_unrouted_experts=False, **args)
    released = LLM(tiny_model, routing_policies=policies, **args)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2, prompt_logprobs=2)
    prompt = list(range(10, 30))
    want, got = (llm.generate([prompt], params, use_tqdm=False)[0] for llm in (masked, released))
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert got.outputs[0].logprobs == want.outputs[0].logprobs and got.prompt_logprobs == want.prompt_logprobs
    layer_bytes = masked.engine.model.moe_blocks()[0].experts.nbytes()
    assert released.engine.released_expert_bytes == len(policies) * layer_bytes * len(removed) // config.num_experts
    assert released.engine.weight_bytes == masked.engine.weight_bytes - released.engine.released_expert_bytes
    load = released.expert_load()
    assert load.shape == (config.num_layers, config.num_experts)  # original expert ids
    assert load.sum() > 0 and load[:, removed].sum() == 0  # redirected slots count for the expert serving them
    with pytest.raises(ValueError, match=r"reaches experts \[1, 2, 5\], whose weights were released"):
        released.set_routing_policies({})


def test_a_forward_counts_the_experts_it_read() -> None:
    load = ExpertLoad(num_layers=2, num_experts=6)
    load.record(1, torch.tensor([[0, 2], [2, 6], [5, 0]]))  # experts 0, 2, 5 and one dropped slot
    load.record(1, torch.tensor([[4, 4]]))
    read = load.experts_read()
    assert read.shape == (2, 7) and read[1, 3] == 1 and read[1, 1] == 1 and read.sum() == 2
    assert load.snapshot()[1].tolist() == [2, 0, 2, 0, 2, 1]


@pytest.mark.parametrize("counted", [None, 1, 0], ids=["no-mask", "counted", "masked"])
def test_a_one_token_step_is_counted_as_a_batch_step_counts_it(counted: int | None) -> None:
    one, batch = ExpertLoad(num_layers=2, num_experts=8), ExpertLoad(num_layers=2, num_experts=8)
    ids = torch.tensor([[3, 8, 3, 5]])  # expert 3 twice (a redirect) and a dropped slot (the sentinel, 8)
    one.record(1, ids, None if counted is None else torch.tensor([counted]))
    # The same token beside an uncounted copy of itself: the same experts read, the same tokens counted.
    batch.record(1, ids.repeat(2, 1), torch.tensor([1 if counted is None else counted, 0]))
    assert torch.equal(one.counts, batch.counts)
    assert one.snapshot()[1].tolist() == ([0, 0, 0, 2, 0, 1, 0, 0] if counted != 0 else [0] * 8)
    assert one.experts_read()[1].tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 0]  # one forward that read 2 experts


def test_only_grouped_bf16_dispatch_is_free_of_host_syncs() -> None:
    """What decides whether decode may run from CUDA graphs (engine.compiled): grouped_mm in bf16 only."""
    block = moe_block()
    assert block.dispatch_syncs_host  # fp32: grouped_mm's fallback reads the offsets on the host
    block.to(torch.bfloat16)
    assert not block.dispatch_syncs_host
    block.set_backend("loop")
    assert block.dispatch_syncs_host
