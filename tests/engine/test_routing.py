"""Per-token routing controls and batch-aware expert substitution: in route() and through the engine."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from engine import LLM, RoutingPolicy, SamplingParams
from engine.moe import SparseMoE, dispatch
from engine.routing import route
from engine.sampling_params import InvalidRequestError
from engine.token_routing import PADDING_ROW, TokenRouting

E, K, H, I = 8, 4, 32, 16


def controls(rows: list[tuple[float, float, float, float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def decode_rows(tokens: int, keep_top: int, min_similarity: float) -> torch.Tensor:
    return controls([TokenRouting(keep_top=keep_top, min_similarity=min_similarity).row(True)] * tokens)


def random_similarity(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    a = torch.rand(E, E, generator=generator) * 2 - 1
    return (a + a.T) / 2


def test_default_controls_route_as_the_model_does() -> None:
    logits = torch.randn(20, E)
    plain = route(logits, K, True)
    for generated in (False, True):
        ruled = route(logits, K, True, None, controls([TokenRouting().row(generated)] * 20))
        assert torch.equal(ruled.expert_ids, plain.expert_ids) and torch.equal(ruled.weights, plain.weights)


def test_a_similarity_above_one_substitutes_nothing() -> None:
    logits = torch.randn(32, E)
    policy = RoutingPolicy(similarity=random_similarity())
    plain = route(logits, K, True, policy)
    for rho in (1.01, math.inf):
        kept = route(logits, K, True, policy, decode_rows(32, keep_top=1, min_similarity=rho))
        assert torch.equal(kept.expert_ids, plain.expert_ids) and torch.equal(kept.weights, plain.weights)


@pytest.mark.parametrize("keep_top", [1, 2, 3])
def test_substitutes_come_from_the_kept_union_and_dropping_bounds_the_step(keep_top: int) -> None:
    torch.manual_seed(keep_top)
    logits = torch.randn(3, E) * 3  # three tokens: their first slots leave experts outside the union
    plain = route(logits, K, True)
    union = set(plain.expert_ids[:, :keep_top].flatten().tolist())
    assert len(union) < E
    keep = route(logits, K, True, RoutingPolicy(similarity=random_similarity()), decode_rows(3, keep_top, -1.0))
    served = keep.expert_ids[keep.expert_ids < E]
    assert set(served.tolist()) <= union  # every slot now reads a kept expert ...
    assert torch.equal(keep.expert_ids[:, :keep_top], plain.expert_ids[:, :keep_top])  # ... the first ones as routed
    outside = ~torch.isin(plain.expert_ids, torch.tensor(sorted(union)))
    assert outside.any() or keep_top > 1  # one kept slot per token leaves some outside
    assert (keep.expert_ids != plain.expert_ids).any() == outside.any()
    # A slot moved onto an expert its token already uses is merged into that slot: same mass, no repeats.
    torch.testing.assert_close(keep.weights.sum(dim=1), plain.weights.sum(dim=1))
    for row in keep.expert_ids:
        live = row[row < E].tolist()
        assert len(live) == len(set(live))
    policy = RoutingPolicy(similarity=random_similarity(), drop_unmatched=True)
    dropped = route(logits, K, True, policy, decode_rows(3, keep_top, 0.5))
    assert set(dropped.expert_ids[dropped.expert_ids < E].tolist()) <= union
    assert (dropped.weights[dropped.expert_ids == E] == 0).all()


def test_the_result_does_not_depend_on_the_order_of_the_batch() -> None:
    logits = torch.randn(16, E) * 2
    policy = RoutingPolicy(similarity=random_similarity(1))
    rows = controls([TokenRouting(keep_top=1 + i % 3, min_similarity=0.1 * (i % 4)).row(True) for i in range(16)])
    order = torch.randperm(16)
    whole = route(logits, K, True, policy, rows)
    shuffled = route(logits[order], K, True, policy, rows[order])
    assert torch.equal(shuffled.expert_ids, whole.expert_ids[order])
    assert torch.equal(shuffled.weights, whole.weights[order])


def test_prompt_and_padding_rows_never_substitute_and_padding_widens_nothing() -> None:
    logits = torch.randn(12, E) * 3
    policy = RoutingPolicy(similarity=torch.ones(E, E))  # every expert stands in for every other
    prompt = route(logits, K, True, policy, controls([TokenRouting(keep_top=1).row(False)] * 12))
    assert torch.equal(prompt.expert_ids, route(logits, K, True).expert_ids)
    # One decode row and eleven padding rows: only the decode row's first expert is kept, and all its slots
    # merge into it.
    rows = controls([TokenRouting(keep_top=1).row(True)] + [PADDING_ROW] * 11)
    routed = route(logits, K, True, policy, rows)
    plain = route(logits, K, True)
    assert routed.expert_ids[0, 0] == plain.expert_ids[0, 0] and (routed.expert_ids[0, 1:] == E).all()
    torch.testing.assert_close(routed.weights[0, 0], plain.weights[0].sum())  # merged into one slot


def test_an_identical_expert_substitutes_at_zero_cost() -> None:
    torch.manual_seed(0)
    block = SparseMoE(0, H, E, K, I, norm_topk_prob=True)
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.3)
    with torch.no_grad():  # expert 5 is a copy of expert 2
        block.experts.gate_up_proj[5] = block.experts.gate_up_proj[2]
        block.experts.down_proj[5] = block.experts.down_proj[2]
    similarity = torch.eye(E)
    similarity[2, 5] = similarity[5, 2] = 1.0
    logits = torch.full((2, E), -5.0)
    logits[0, [5, 0, 1, 3]] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # token 0 keeps expert 5 first
    logits[1, [6, 7, 2, 4]] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # token 1 uses expert 2 in its third slot
    x = torch.randn(2, H)
    plain = route(logits, K, True)
    swapped = route(logits, K, True, RoutingPolicy(similarity=similarity), decode_rows(2, 1, 0.99))
    assert swapped.expert_ids[1].tolist() == [6, 7, 5, 4]  # 2 -> 5; 7 and 4 have no stand-in above 0.99
    # Equal up to summation order (expert 5 now multiplies two rows at once).
    torch.testing.assert_close(dispatch(x, swapped, block.experts, "loop"), dispatch(x, plain, block.experts, "loop"))


def test_experts_per_token_renormalizes_the_kept_slots() -> None:
    logits = torch.randn(6, E)
    rows = controls([TokenRouting(experts_per_token=2).row(False)] * 3 + [TokenRouting().row(False)] * 3)
    routed = route(logits, K, True, None, rows)
    two = route(logits, 2, True)
    assert torch.equal(routed.expert_ids[:3, :2], two.expert_ids[:3]) and (routed.expert_ids[:3, 2:] == E).all()
    torch.testing.assert_close(routed.weights[:3, :2], two.weights[:3])
    assert torch.equal(routed.expert_ids[3:], route(logits, K, True).expert_ids[3:])


def similarity_policies(llm: LLM) -> dict[int, RoutingPolicy]:
    """Each MoE layer's policy with a similarity map from its experts' weights (cosine of the flattened rows)."""
    policies = {}
    for block in llm.engine.model.moe_blocks():
        flat = torch.nn.functional.normalize(block.experts.gate_up_proj.flatten(1).float(), dim=1)
        policies[block.layer_idx] = RoutingPolicy(similarity=flat @ flat.T)
    return policies


def values(logprobs: list | None) -> list[float]:
    """The chosen tokens' logprobs of a prompt_logprobs or logprobs list (None entries skipped)."""
    return [entry[token].logprob for entry in logprobs or [] if entry for token in list(entry)[:1]]


def test_budgets_mix_in_one_batch_and_substitution_touches_generated_tokens_only(tiny_model: Path) -> None:
    llm = LLM(tiny_model, dtype="float32", device="cpu", max_model_len=64)
    llm.engine.set_routing_policies(similarity_policies(llm))
    prompts = [list(range(10, 30)), list(range(40, 57))]

    def params(routing: TokenRouting | None) -> SamplingParams:
        return SamplingParams(
            temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0, prompt_logprobs=0, routing=routing
        )

    one_expert = TokenRouting(experts_per_token=1)
    alone = [llm.generate([p], params(r), use_tqdm=False)[0] for p, r in zip(prompts, (one_expert, None))]
    # Same prompts again, together: the cached prefix of the first prompt was computed under its own budget.
    together = llm.generate(prompts, [params(one_expert), params(None)], use_tqdm=False)
    for a, b in zip(alone, together):  # equal up to batching's summation order
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert values(b.prompt_logprobs) == pytest.approx(values(a.prompt_logprobs), abs=1e-5)
    plain = llm.generate(prompts[:1], params(None), use_tqdm=False)[0]
    assert (
        plain.outputs[0].token_ids != alone[0].outputs[0].token_ids or plain.prompt_logprobs != alone[0].prompt_logprobs
    )
    substituted = llm.generate(prompts[:1], params(TokenRouting(keep_top=1, min_similarity=-1.0)), use_tqdm=False)[0]
    # Prompt tokens route as the model does; generated ones read only their first expert's stand-ins.
    assert values(substituted.prompt_logprobs) == pytest.approx(values(plain.prompt_logprobs), abs=1e-5)
    assert values(substituted.outputs[0].logprobs) != pytest.approx(values(plain.outputs[0].logprobs), abs=1e-3)


def test_bad_budgets_are_refused_naming_the_field(tiny_model: Path) -> None:
    llm = LLM(tiny_model, dtype="float32", device="cpu", max_model_len=64)
    top_k = llm.engine.model.config.top_k
    with pytest.raises(InvalidRequestError, match=f"experts_per_token must be in 1..{top_k}"):
        llm.engine.add_request("a", [1, 2, 3], SamplingParams(routing=TokenRouting(experts_per_token=top_k + 1)))
    with pytest.raises(InvalidRequestError, match="substitution needs the experts' similarity map"):
        llm.engine.add_request("b", [1, 2, 3], SamplingParams(routing=TokenRouting(keep_top=1)))
    assert not llm.engine.has_unfinished_requests()


def test_prefix_cache_salt_follows_what_tokens_compute() -> None:
    assert TokenRouting().cache_salt == TokenRouting(min_similarity=0.5).cache_salt == b""  # no substitution
    salts = {
        TokenRouting(keep_top=1).cache_salt,
        TokenRouting(keep_top=2).cache_salt,
        TokenRouting(min_prob=0.1).cache_salt,
    }
    assert len(salts) == 3 and b"" not in salts


def test_a_default_switch_reaches_requests_in_flight_but_not_their_own_budgets(tiny_model: Path) -> None:
    llm = LLM(tiny_model, dtype="float32", device="cpu", max_model_len=64)
    engine = llm.engine
    engine.set_routing_policies(similarity_policies(llm))

    def run(switch_at: int) -> dict[str, list[float]]:
        greedy = {"temperature": 0.0, "max_tokens": 12, "ignore_eos": True, "logprobs": 0}
        engine.add_request("follows", list(range(10, 30)), SamplingParams(**greedy))
        engine.add_request("own", list(range(40, 57)), SamplingParams(**greedy, routing=TokenRouting()))
        finished, step = {}, 0
        while engine.has_unfinished_requests():
            if step == switch_at:
                engine.set_token_routing(TokenRouting(keep_top=1, min_similarity=-1.0))
            finished.update((o.request_id, values(o.outputs[0].logprobs)) for o in engine.step() if o.finished)
            step += 1
        engine.set_token_routing(TokenRouting())
        return finished

    plain, switched = run(-1), run(4)
    assert switched["own"] == pytest.approx(plain["own"], abs=1e-5)  # its own budget: untouched
    assert switched["follows"][:3] == pytest.approx(plain["follows"][:3], abs=1e-5)  # before the switch
    assert switched["follows"][4:] != pytest.approx(plain["follows"][4:], abs=1e-3)  # from the next step on
