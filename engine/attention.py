"""Attention over a flattened token batch: dense causal (training, calibration) or a paged KV cache (serving).

The KV cache of one layer is a tensor [2, num_blocks, block_size, kv_heads, head_dim]; a sequence's tokens
live in the blocks its block table lists. Serving attention is one custom op per layer,
`moe_serve::paged_attention`, which reads the step's metadata and caches from the forward context (set by
the model runner around each forward): so a compiled forward sees a single opaque node per layer, with no
guard on the step's shapes or tensors, and the same op serves decode-only, prefill and mixed steps. Decode
rows come first (one query each) and run in one call, through the CPU kernel that reads the cache in place
where it is built, else a block gather and SDPA; prefill chunks run one SDPA call each.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.cpu_kernels import SUFFIX, kernels
from engine.native_ops import StepContext, native_ops, native_ops_loaded
from engine.op_library import define_op


@dataclass(frozen=True)
class DenseCausal:
    """A [batch, seq_len] batch of whole sequences, flattened row-major, with no KV cache."""

    batch_size: int
    seq_len: int


class Paged:
    """Marks a serving forward: attention metadata and caches come from the forward context."""

    def __repr__(self) -> str:
        return "PAGED"


PAGED = Paged()
AttentionMetadata = DenseCausal | Paged


@dataclass(frozen=True)
class PrefillChunk:
    """Query rows [start, start + length) of one sequence whose cache holds context_len tokens after this step."""

    start: int
    length: int
    context_len: int
    block_table: torch.Tensor


@dataclass(frozen=True)
class PagedStep:
    """One serving step's attention inputs: where each token's keys go, and what each query attends to.

    Rows [0, num_decodes) are single-token decodes, one per sequence, described by decode_block_tables
    [num_decodes, W] (the first decode_width columns are used) and decode_seq_lens [num_decodes] (tokens in
    the cache after this step); the prefill chunks follow.
    """

    kv_caches: list[torch.Tensor]
    slot_mapping: torch.Tensor
    num_decodes: int
    decode_block_tables: torch.Tensor | None
    decode_seq_lens: torch.Tensor | None
    decode_width: int
    prefills: tuple[PrefillChunk, ...]


_current_step: PagedStep | None = None
_native_context: StepContext | None = None  # what the C++ op reads of _current_step (engine/native_ops.py)


@contextmanager
def paged_step(step: PagedStep) -> Iterator[None]:
    """The forward context: paged attention reads this step's metadata and caches inside the block (and so does
    its C++ twin, engine/native_ops.py, on the CPU)."""
    global _current_step, _native_context
    native = native_ops() if step.kv_caches[0].device.type == "cpu" else None
    previous, previous_context = _current_step, _native_context
    _current_step = step
    if native is not None:
        _native_context = native.step_context(step)
        native.set_step_context(_native_context)
    try:
        yield
    finally:
        _current_step, _native_context = previous, previous_context
        if native is not None:
            native.set_step_context(previous_context)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, layer: int, scale: float
) -> torch.Tensor:
    """q [T, Hq, D], k and v [T, Hkv, D] -> [T, Hq, D]."""
    if isinstance(meta, DenseCausal):
        shape = (meta.batch_size, meta.seq_len, -1, q.shape[-1])
        queries, keys, values = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        gqa = q.shape[1] != k.shape[1]
        out = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(q.shape)
    if q.device.type == "cpu" and native_ops_loaded():
        return torch.ops.moe_serve.cpu_paged_attention(q, k, v, layer, scale)
    return torch.ops.moe_serve.paged_attention(q, k, v, layer, scale)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    """Write this step's keys and values into layer's cache, then attend (see the module docstring)."""
    step = _current_step
    assert step is not None, "paged attention runs inside paged_step(...)"
    k_cache, v_cache = step.kv_caches[layer][0], step.kv_caches[layer][1]
    cpu = kernels() if q.device.type == "cpu" and k_cache.dtype in SUFFIX else None
    if cpu is not None and not step.prefills:  # the decode-only step: one kernel call writes and attends
        assert step.decode_block_tables is not None and step.decode_seq_lens is not None
        new_kv = (k.contiguous(), v.contiguous(), step.slot_mapping)
        tables, lens = step.decode_block_tables, step.decode_seq_lens
        return cpu.paged_decode_attention(q.contiguous(), k_cache, v_cache, tables, lens, scale, new_kv)
    kv_shape = (-1, *k_cache.shape[2:])
    k_cache.view(kv_shape).index_copy_(0, step.slot_mapping, k)
    v_cache.view(kv_shape).index_copy_(0, step.slot_mapping, v)
    out = torch.empty_like(q)
    if step.num_decodes:
        assert step.decode_block_tables is not None and step.decode_seq_lens is not None
        rows = slice(0, step.num_decodes)
        tables, lens = step.decode_block_tables, step.decode_seq_lens
        out[rows] = _decode(q[rows], k_cache, v_cache, tables, lens, step.decode_width, scale)
    gqa = q.shape[1] != k.shape[1]
    for chunk in step.prefills:
        rows = slice(chunk.start, chunk.start + chunk.length)
        queries = q[rows].transpose(0, 1)
        if chunk.context_len == chunk.length:
            keys, values, mask, causal = k[rows].transpose(0, 1), v[rows].transpose(0, 1), None, True
        else:
            keys = _gather_blocks(k_cache, chunk.block_table)[: chunk.context_len].transpose(0, 1)
            values = _gather_blocks(v_cache, chunk.block_table)[: chunk.context_len].transpose(0, 1)
            first_pos = chunk.context_len - chunk.length
            query_pos = torch.arange(first_pos, chunk.context_len, device=q.device)
            mask = torch.arange(chunk.context_len, device=q.device)[None, :] <= query_pos[:, None]
            causal = False
        out[rows] = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
        ).transpose(0, 1)
    return out


def _paged_attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    return torch.empty_like(q)


define_op(
    "paged_attention(Tensor q, Tensor k, Tensor v, int layer, float scale) -> Tensor",
    paged_attention,
    _paged_attention_shape,
)


def _decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    width_blocks: int,
    scale: float,
) -> torch.Tensor:
    """One query per sequence against its cached tokens, [B, Hq, D]."""
    cpu = kernels() if q.device.type == "cpu" and k_cache.dtype in SUFFIX else None
    if cpu is not None:
        return cpu.paged_decode_attention(q.contiguous(), k_cache, v_cache, block_tables, seq_lens, scale)
    block_tables = block_tables[:, :width_blocks]
    width = width_blocks * k_cache.shape[1]
    mask = (torch.arange(width, device=q.device)[None, :] < seq_lens[:, None])[:, None, None, :]
    keys = _gather_blocks(k_cache, block_tables).transpose(1, 2)
    values = _gather_blocks(v_cache, block_tables).transpose(1, 2)
    gqa = q.shape[1] != k_cache.shape[2]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.squeeze(2)


def _gather_blocks(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """The cached tokens of the listed blocks, [..., blocks * block_size, kv_heads, head_dim].

    index_select is several times faster than advanced indexing for this gather on CPU.
    """
    gathered = cache.index_select(0, block_table.reshape(-1))
    return gathered.view(*block_table.shape[:-1], -1, *cache.shape[2:])
