"""The C++ serving ops (engine/native_ops.cpp) against what they replace: paged decode attention against SDPA
over the written cache, the routed experts against the sorted reference dispatch (also after experts were
released, and with a row map), the routed-slot counts against ExpertLoad's torch ops, what they leave to the Python
ops (prefill chunks, another MoE backend, odd inputs) served by those, and an engine's steps served in C++."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from engine.attention import PagedStep, PrefillChunk, paged_step
from engine.cpu_kernels import kernels
from engine.moe import SparseMoE, _dispatch_sorted, count_routes, serving_experts
from engine.native_ops import native_ops
from engine.projections import kernel_rows

pytestmark = pytest.mark.skipif(native_ops() is None, reason="no C/C++ compiler: the C++ serving ops cannot be built")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def served() -> dict[str, int]:
    ops = native_ops()
    assert ops is not None
    return ops.served()


def grew(before: dict[str, int]) -> dict[str, int]:
    return {name: count - before[name] for name, count in served().items()}


def paged_caches(
    dtype: torch.dtype, layers: int, blocks: int, block_size: int, kv_heads: int, head_dim: int
) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(layers + blocks)
    shape = (2, blocks, block_size, kv_heads, head_dim)
    return [torch.randn(shape, generator=generator).to(dtype) for _ in range(layers)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "views-of-one-projection"])
def test_decode_attention_writes_the_new_keys_and_attends_over_the_cache(dtype: torch.dtype, fused: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    block_size, q_heads, kv_heads, head_dim, width = 8, 4, 2, 32, 4
    lengths = torch.tensor([1, 8, 9, 30])
    batch = len(lengths)
    caches = paged_caches(dtype, 2, batch * width + 1, block_size, kv_heads, head_dim)
    tables = torch.randperm(batch * width, generator=generator).view(batch, width)
    last = lengths - 1
    slots = tables[torch.arange(batch), last // block_size] * block_size + last % block_size
    qkv = torch.randn(batch, (q_heads + 2 * kv_heads) * head_dim, generator=generator).to(dtype)
    q, k, v = (
        part.view(batch, -1, head_dim) for part in qkv.split([q_heads * head_dim, *[kv_heads * head_dim] * 2], 1)
    )
    if not fused:  # else strided rows, as the many-token graph passes them
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    assert q.is_contiguous() != fused
    step = PagedStep(caches, slots, batch, tables, lengths, width, ())
    before = served()
    with torch.inference_mode(), paged_step(step):
        out = torch.ops.moe_serve.cpu_paged_attention(q, k, v, 1, head_dim**-0.5)
    assert grew(before)["attention"] == 1 and grew(before)["attention_reference"] == 0
    k_cache, v_cache = caches[1][0], caches[1][1]
    for b in range(batch):
        keys = k_cache[tables[b]].reshape(-1, kv_heads, head_dim)[: lengths[b]].float()
        values = v_cache[tables[b]].reshape(-1, kv_heads, head_dim)[: lengths[b]].float()
        assert torch.equal(keys[-1], k[b].float()) and torch.equal(values[-1], v[b].float())  # written first
        expected = F.scaled_dot_product_attention(
            q[b].float()[:, None, :], keys.transpose(0, 1), values.transpose(0, 1), scale=head_dim**-0.5,
            enable_gqa=True,
        )[:, 0]  # fmt: skip
        assert torch.allclose(out[b].float(), expected, atol=TOLERANCE[dtype] * 4, rtol=TOLERANCE[dtype])


def test_a_step_with_a_prefill_chunk_is_served_by_the_python_op() -> None:
    generator = torch.Generator().manual_seed(5)
    block_size, heads, head_dim = 8, 2, 16
    caches = paged_caches(torch.float32, 1, 4, block_size, heads, head_dim)
    # One decode row (a sequence of 3 tokens in block 0), then a 5-token prompt in blocks 1 and 2.
    slots = torch.tensor([2, 8, 9, 10, 11, 12])
    tables, lengths = torch.tensor([[0]]), torch.tensor([3])
    step = PagedStep(caches, slots, 1, tables, lengths, 1, (PrefillChunk(1, 5, 5, torch.tensor([1, 2])),))
    q, k, v = (torch.randn(6, heads, head_dim, generator=generator) for _ in range(3))
    before = served()
    with torch.inference_mode(), paged_step(step):
        reference = torch.ops.moe_serve.paged_attention(q, k, v, 0, 0.25)
        out = torch.ops.moe_serve.cpu_paged_attention(q, k, v, 0, 0.25)
    assert grew(before)["attention_reference"] == 1 and grew(before)["attention"] == 0
    assert torch.equal(out, reference)


def test_a_failure_of_the_python_op_it_hands_a_call_to_is_raised() -> None:
    q = torch.randn(1, 2, 16)
    with pytest.raises(RuntimeError, match="moe_serve::paged_attention failed"):
        torch.ops.moe_serve.cpu_paged_attention(q, q, q, 0, 1.0)  # outside paged_step: the Python op asserts


def moe_block(dtype: torch.dtype, experts: int = 8, hidden: int = 64, width: int = 32) -> SparseMoE:
    block = SparseMoE(0, hidden, experts, 2, width, norm_topk_prob=True)
    generator = torch.Generator().manual_seed(experts)
    with torch.no_grad():
        for weight in (block.experts.gate_up_proj, block.experts.down_proj):
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)
    block.experts.requires_grad_(False)
    return block.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routed_experts_match_the_reference_dispatch_also_after_a_release(dtype: torch.dtype) -> None:
    block = moe_block(dtype)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(5, 64, generator=generator).to(dtype)
    ids = torch.tensor([[0, 3], [7, 1], [3, 3], [5, 8], [2, 6]])  # 8: a dropped slot
    weights = torch.rand(5, 2, generator=generator)
    for keep in (None, torch.tensor([True, False, True, True, False, True, False, True])):
        if keep is not None:
            block.release_experts(keep)  # experts 1, 4 and 6 go: their slots are dropped
        w13, w2 = block.experts.gate_up_proj, block.experts.down_proj
        expected = _dispatch_sorted(x.float(), block.held_rows(ids), weights, w13.float(), w2.float(), loop=True)
        before = served()
        with torch.inference_mode(), serving_experts([block]):
            got = torch.ops.moe_serve.cpu_layer_experts(x, ids, weights, 0)
        assert grew(before)["experts"] == 1
        assert torch.allclose(got, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_another_moe_backend_is_served_by_the_python_op() -> None:
    block = moe_block(torch.float32)
    block.set_backend("loop")
    x, ids, weights = torch.randn(3, 64), torch.tensor([[0, 1], [2, 3], [4, 5]]), torch.rand(3, 2)
    before = served()
    with torch.inference_mode(), serving_experts([block]):
        got = torch.ops.moe_serve.cpu_layer_experts(x, ids, weights, 0)
        reference = torch.ops.moe_serve.layer_experts(x, ids, weights, 0)
    assert grew(before)["experts_reference"] == 1 and grew(before)["experts"] == 0
    assert torch.equal(got, reference)


def test_an_engines_decode_steps_are_served_in_cpp(tiny_model: Path) -> None:
    llm = LLM(tiny_model, dtype="float32", max_model_len=128)
    layers = llm.engine.model.config.num_layers
    moe_layers = sum(isinstance(layer.mlp, SparseMoE) for layer in llm.engine.model.model.layers)
    before = served()
    llm.generate([[3, 14, 15, 92, 65, 35]], SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
                 use_tqdm=False)  # fmt: skip
    counts = grew(before)
    assert counts["attention"] == 8 * layers and counts["attention_reference"] == layers  # the prefill
    assert moe_layers and counts["experts"] == 9 * moe_layers and counts["experts_reference"] == 0
    assert counts["count_routes"] == moe_layers and counts["count_routes_reference"] == 0  # the prefill's


@pytest.mark.parametrize(("tokens", "top_k", "experts"), [(2, 4, 32), (37, 8, 64), (100, 1, 8)])
def test_route_counts_match_expert_loads_torch_ops(tokens: int, top_k: int, experts: int) -> None:
    """Random slots, the dropped-slot sentinel among them, half the tokens masked out, into every layer of
    counts that are not zero: the same columns as the reference, served in C++."""
    generator = torch.Generator().manual_seed(tokens)
    for layer in range(3):
        ids = torch.randint(0, experts + 1, (tokens, top_k), generator=generator)
        mask = torch.randint(0, 2, (tokens,), generator=generator)
        expected = torch.randint(0, 5, (3, 2 * experts + 3), generator=generator)
        got = expected.clone()
        count_routes(expected, ids, mask, layer)
        before = served()
        torch.ops.moe_serve.cpu_count_routes(got, ids, mask, layer)
        assert grew(before)["count_routes"] == 1 and torch.equal(got, expected)


def test_route_counts_the_cpp_op_does_not_take_go_to_the_reference() -> None:
    """Strided ids, a strided mask or strided counts: the reference's answer; an id past the sentinel: its error."""
    ids, mask = torch.tensor([[0, 3], [3, 8], [5, 5]]), torch.tensor([1, 0, 1])
    expected = torch.zeros(2, 19, dtype=torch.long)
    count_routes(expected, ids, mask, 1)
    cases = (
        (torch.zeros(2, 19, dtype=torch.long), ids.t().contiguous().t(), mask),
        (torch.zeros(2, 19, dtype=torch.long), ids, torch.tensor([1, 7, 0, 7, 1])[::2]),
        (torch.zeros(19, 2, dtype=torch.long).t(), ids, mask),
    )
    for got, *args in cases:
        before = served()
        torch.ops.moe_serve.cpu_count_routes(got, *args, 1)
        assert grew(before)["count_routes_reference"] == 1 and torch.equal(got, expected)
    with pytest.raises(RuntimeError, match="count_routes"):
        torch.ops.moe_serve.cpu_count_routes(expected, torch.tensor([[0, 9], [9, 0]]), mask[:2], 0)


def test_dense_linears_run_the_kernel_in_cpp_and_leave_the_rest_to_the_reference() -> None:
    """bf16 rows up to the kernel's limit: the kernel's values, served here; fp32, more rows than the limit, or
    a weight that is a view: the Python op, the same answer."""
    cpu = kernels()
    assert cpu is not None
    generator = torch.Generator().manual_seed(11)
    weights = [torch.randn(n, 64, generator=generator).bfloat16() for n in (64, 32, 32)]
    ops = torch.ops.moe_serve
    for rows in (1, 3, 20):
        x = torch.randn(rows, 64, generator=generator).bfloat16()
        before = served()
        got = ops.cpu_dense_linears(x, weights)
        assert grew(before)["dense_linears"] == 1 and torch.equal(got, cpu.linears(x, tuple(weights)))
    x = torch.randn(kernel_rows() + 1, 64, generator=generator).bfloat16()
    wide = torch.randn(32, 128, generator=generator).bfloat16()[:, :64]  # not contiguous
    for args in ((x, weights), (x[:4].float(), [w.float() for w in weights]), (x[:4], [weights[0], wide])):
        before = served()
        got = ops.cpu_dense_linears(*args)
        assert grew(before)["dense_linears_reference"] == 1
        expected = torch.cat([F.linear(args[0], w) for w in args[1]], dim=-1)
        torch.testing.assert_close(got, expected, atol=0.1, rtol=2e-2)
