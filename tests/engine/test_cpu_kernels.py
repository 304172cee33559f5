"""The CPU kernels against torch's reference ops: the expert MLP against the sorted grouped and loop dispatch,
paged decode attention against SDPA over gathered blocks, in fp32 (1e-5) and bf16, the bf16 LM-head product
and the several-weight projections against torch's linear; and an engine without the
kernels (no compiler, or MOE_SERVE_CPU_KERNELS=0) generates the same tokens through torch's ops."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from engine.cpu_kernels import kernels
from engine.moe import _dispatch_sorted
from engine.native_ops import native_ops

pytestmark = pytest.mark.skipif(kernels() is None, reason="no C compiler: the CPU kernels cannot be built")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_expert_mlp_matches_the_reference_dispatch(dtype: torch.dtype, tokens: int) -> None:
    generator = torch.Generator().manual_seed(tokens)
    experts, hidden, width, k = 12, 48, 32, 3  # 12 weight rows, e.g. after pruning released some
    w13 = (torch.randn(experts, 2 * width, hidden, generator=generator) * 0.1).to(dtype)
    w2 = (torch.randn(experts, hidden, width, generator=generator) * 0.1).to(dtype)
    x = torch.randn(tokens, hidden, generator=generator).to(dtype)
    ids = torch.stack([torch.randperm(experts, generator=generator)[:k] for _ in range(tokens)])
    ids[0, -1] = experts  # a dropped slot: no expert, no contribution
    weights = torch.rand(tokens, k, generator=generator)
    cpu = kernels()
    assert cpu is not None
    got = cpu.expert_mlp(x, ids, weights, w13, w2)
    for loop in (False, True):
        expected = _dispatch_sorted(x.float(), ids, weights, w13.float(), w2.float(), loop=loop)
        assert torch.allclose(got, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


HAS_BF16_DOT = "avx512_bf16" in Path("/proc/cpuinfo").read_text()


@pytest.fixture(params=["vdpbf16ps", "amx"])
def bf16_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """The bf16 kernels on the vdpbf16ps path, then on AMX tiles where the CPU and the OS grant them."""
    cpu = kernels()
    assert cpu is not None
    was = cpu.use_amx()
    if not cpu.use_amx(request.param == "amx") and request.param == "amx":
        pytest.skip("no AMX tiles here")
    yield request.param
    cpu.use_amx(was)


def _fast_path_case(tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """x, expert ids (one slot dropped), routing weights, w13 and w2 in shapes the fast expert paths take
    (multiples of 32): 6 experts, so 90 tokens give every expert more than a tile's 16 rows."""
    generator = torch.Generator().manual_seed(tokens)
    experts, hidden, width, k = 6, 96, 64, 3
    w13 = (torch.randn(experts, 2 * width, hidden, generator=generator) * 0.1).to(dtype)
    w2 = (torch.randn(experts, hidden, width, generator=generator) * 0.1).to(dtype)
    x = torch.randn(tokens, hidden, generator=generator).to(dtype)
    ids = torch.stack([torch.randperm(experts, generator=generator)[:k] for _ in range(tokens)])
    ids[0, -1] = experts  # a dropped slot
    return x, ids, torch.rand(tokens, k, generator=generator), w13, w2


@pytest.mark.skipif(not HAS_BF16_DOT, reason="no bf16 dot-product instruction")
@pytest.mark.parametrize("tokens", [1, 5, 40, 90])
def test_bf16_expert_mlp_matches_the_reference_dispatch_on_each_path(tokens: int, bf16_path: str) -> None:
    """One token stays on vdpbf16ps either way (one row per expert would not fill AMX's tiles)."""
    x, ids, weights, w13, w2 = _fast_path_case(tokens, torch.bfloat16)
    cpu = kernels()
    assert cpu is not None
    got = cpu.expert_mlp(x, ids, weights, w13, w2)
    expected = _dispatch_sorted(x.float(), ids, weights, w13.float(), w2.float(), loop=False)
    assert torch.allclose(got, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("tokens", [1, 5, 40, 90])
def test_fp32_expert_mlp_matches_the_reference_dispatch_on_its_fast_path(tokens: int) -> None:
    """The AVX-512 fp32 path (the generic loops serve other shapes), to 1e-5."""
    x, ids, weights, w13, w2 = _fast_path_case(tokens, torch.float32)
    cpu = kernels()
    assert cpu is not None
    got = cpu.expert_mlp(x, ids, weights, w13, w2)
    expected = _dispatch_sorted(x, ids, weights, w13, w2, loop=False)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("q_heads", "kv_heads", "head_dim"), [(8, 8, 32), (8, 2, 64), (4, 1, 128)])
@pytest.mark.parametrize(
    ("block_size", "lengths"),
    [
        # One token, a full block, a block boundary, many blocks: on 2 threads a task per KV head (too few
        # sequences to share out whole rows), on 1 every KV head per task.
        (16, [1, 16, 17, 130, 300]),
        (8, [1, 8, 9, 16, 17, 33, 130, 160, 3, 64, 100, 7]),  # blocks smaller than a chunk; every KV head per task
        (32, [1, 15, 16, 17, 31, 32, 33, 300, 250, 64]),  # chunk boundaries inside a block
    ],
    ids=["block16", "block8-many", "block32-many"],
)
def test_paged_decode_attention_matches_sdpa(
    dtype: torch.dtype, q_heads: int, kv_heads: int, head_dim: int, block_size: int, lengths: list[int]
) -> None:
    generator = torch.Generator().manual_seed(q_heads + head_dim + block_size)
    width = -(-max(lengths) // block_size)
    batch = len(lengths)
    lengths = torch.tensor(lengths)
    blocks = width * batch + 1  # each sequence its own blocks, in shuffled places
    k_cache = torch.randn(blocks, block_size, kv_heads, head_dim, generator=generator).to(dtype)
    v_cache = torch.randn(blocks, block_size, kv_heads, head_dim, generator=generator).to(dtype)
    tables = torch.randperm(blocks, generator=generator)[: width * batch].view(batch, width)
    q = torch.randn(batch, q_heads, head_dim, generator=generator).to(dtype)
    new_k = torch.randn(batch, kv_heads, head_dim, generator=generator).to(dtype)
    new_v = torch.randn(batch, kv_heads, head_dim, generator=generator).to(dtype)
    last = lengths - 1
    slots = tables[torch.arange(batch), last // block_size] * block_size + last % block_size
    scale = head_dim**-0.5
    cpu = kernels()
    assert cpu is not None
    threads = torch.get_num_threads()
    try:
        outs = []
        for task_threads in (1, 2):
            torch.set_num_threads(task_threads)
            outs.append(cpu.paged_decode_attention(q, k_cache, v_cache, tables, lengths, scale, (new_k, new_v, slots)))
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(outs[0].float(), outs[1].float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    out = outs[1]
    for b in range(batch):
        keys = k_cache[tables[b]].reshape(-1, kv_heads, head_dim)[: lengths[b]].float()
        values = v_cache[tables[b]].reshape(-1, kv_heads, head_dim)[: lengths[b]].float()
        assert torch.equal(keys[-1], new_k[b].float()) and torch.equal(values[-1], new_v[b].float())  # written first
        expected = F.scaled_dot_product_attention(
            q[b].float()[:, None, :], keys.transpose(0, 1), values.transpose(0, 1), scale=scale, enable_gqa=True
        )[:, 0]
        assert torch.allclose(out[b].float(), expected, atol=TOLERANCE[dtype] * 4, rtol=TOLERANCE[dtype])


def test_block_tables_too_short_for_the_batch_are_refused() -> None:
    cpu = kernels()
    assert cpu is not None
    cache = torch.zeros(4, 16, 1, 8)
    with pytest.raises(ValueError, match="block-table rows"):
        cpu.paged_decode_attention(torch.zeros(3, 1, 8), cache, cache, torch.zeros(2, 1, dtype=torch.long),
                                   torch.ones(3, dtype=torch.long), 1.0)  # fmt: skip


@pytest.fixture
def without_kernels(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("MOE_SERVE_CPU_KERNELS", "0")
    kernels.cache_clear()
    native_ops.cache_clear()  # the C++ ops run the kernels: off with them
    yield
    monkeypatch.delenv("MOE_SERVE_CPU_KERNELS")
    kernels.cache_clear()
    native_ops.cache_clear()


@pytest.mark.skipif(not HAS_BF16_DOT, reason="no bf16 dot-product instruction")
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_linear_matches_torch_in_bf16_and_declines_what_it_cannot_do(rows: int, bf16_path: str) -> None:
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 64, generator=generator).bfloat16()
    weight = torch.randn(48, 64, generator=generator).bfloat16()
    cpu = kernels()
    assert cpu is not None
    got = cpu.linear(x, weight)
    assert got is not None and got.dtype == torch.float32 and got.shape == (rows, 48)
    assert torch.allclose(got, F.linear(x, weight).float(), atol=0.1, rtol=2e-2)
    assert torch.equal(got, got.bfloat16().float())  # rounded to bf16, as torch's bf16 linear is
    assert cpu.linear(x.float(), weight.float()) is None  # fp32: torch's GEMM
    assert cpu.linear(x, weight[:40]) is None  # 40 output rows: not a multiple of 16


@pytest.mark.skipif(not HAS_BF16_DOT, reason="no bf16 dot-product instruction")
def test_linears_one_row_path_equals_the_tile_path() -> None:
    """Up to 2 rows (a batch-1 step's projections and LM head) take a one-row path: the same sums in the same
    order as the vdpbf16ps tiles that take more rows where AMX is off, so the same bf16 values."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(4, 256, generator=generator).bfloat16()
    weights = tuple(torch.randn(n, 256, generator=generator).bfloat16() for n in (64, 32))
    cpu = kernels()
    assert cpu is not None
    was = cpu.use_amx()
    cpu.use_amx(False)
    try:
        tiles = cpu.linears(x, weights)  # 4 rows: vdpbf16ps tiles
    finally:
        cpu.use_amx(was)
    assert tiles is not None
    for rows in (1, 2):
        assert torch.equal(cpu.linears(x[:rows], weights), tiles[:rows])


@pytest.mark.parametrize("rows, width", [(1, 1), (1, 15), (3, 17), (5, 4096), (32, 4096), (300, 1000)])
def test_argmax_gives_torchs_index_ties_infinities_and_nans_included(rows: int, width: int) -> None:
    cpu = kernels()
    assert cpu is not None
    generator = torch.Generator().manual_seed(rows * width)
    cases = [
        torch.randn(rows, width, generator=generator),
        torch.randint(0, 3, (rows, width), generator=generator).float(),
    ]
    cases.append(torch.full((rows, width), float("-inf")))
    for position in {0, width // 2, width - 1}:  # NaNs: torch answers the first one
        nans = torch.randn(rows, width, generator=generator)
        nans[0, position] = nans[-1, min(width - 1, position + 2)] = float("nan")
        cases.append(nans)
    infinite = torch.randn(rows, width, generator=generator)
    infinite[:, -1] = float("inf")
    cases.append(infinite)
    for x in cases:
        got = cpu.argmax(x)
        assert got is not None and torch.equal(got, x.argmax(dim=-1))
    assert cpu.argmax(torch.randn(2, 8).bfloat16()) is None and cpu.argmax(torch.randn(8, 2).T) is None


@pytest.mark.skipif(not HAS_BF16_DOT, reason="no bf16 dot-product instruction")
@pytest.mark.parametrize("rows", [2, 3, 5, 70])
def test_linears_compute_weights_sharing_an_input_side_by_side(rows: int, bf16_path: str) -> None:
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 64, generator=generator).bfloat16()
    weights = tuple(torch.randn(n, 64, generator=generator).bfloat16() for n in (48, 16, 32))
    cpu = kernels()
    assert cpu is not None
    got = cpu.linears(x, weights)
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == (rows, 96)
    reference = torch.cat([x.float() @ w.float().T for w in weights], dim=-1)
    assert torch.allclose(got.float(), reference, atol=0.1, rtol=2e-2)
    assert cpu.linears(x, (weights[0], weights[1][:8])) is None  # 8 output rows: not a multiple of 16
    assert cpu.linears(x[:, :48].contiguous(), tuple(w[:, :48].contiguous() for w in weights)) is None  # K = 48


def test_an_engine_without_the_kernels_generates_the_same_tokens(
    tiny_model: Path, request: pytest.FixtureRequest
) -> None:
    prompts = [[3, 14, 15, 92, 65, 35], [8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3]]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    with_kernels = LLM(tiny_model, dtype="float32", max_model_len=128).generate(prompts, params, use_tqdm=False)
    request.getfixturevalue("without_kernels")
    assert kernels() is None and native_ops() is None
    reference = LLM(tiny_model, dtype="float32", max_model_len=128).generate(prompts, params, use_tqdm=False)
    for a, b in zip(with_kernels, reference, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for entry_a, entry_b, token in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, a.outputs[0].token_ids):
            assert abs(entry_a[token].logprob - entry_b[token].logprob) < 1e-4
