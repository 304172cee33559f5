"""Attention over a flattened token batch: dense causal (training, calibration) or a paged KV cache (serving).

The KV cache of one layer is a tensor [2, num_blocks, block_size, kv_heads, head_dim]; a sequence's tokens
live in the blocks its block table lists. Single-token queries (decodes) are batched into one call over
their gathered blocks; longer query chunks (prefills) run one call each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DenseCausal:
    """A [batch, seq_len] batch of whole sequences, flattened row-major, with no KV cache."""

    batch_size: int
    seq_len: int


@dataclass(frozen=True)
class PrefillChunk:
    """Query rows [start, start + length) of one sequence whose cache holds context_len tokens after this step."""

    start: int
    length: int
    context_len: int
    block_table: torch.Tensor


@dataclass(frozen=True)
class PagedMetadata:
    """Where this step's tokens go in the KV cache and what each query attends to."""

    slot_mapping: torch.Tensor
    decode_rows: torch.Tensor | None
    decode_block_tables: torch.Tensor | None
    decode_mask: torch.Tensor | None
    prefills: tuple[PrefillChunk, ...]


AttentionMetadata = DenseCausal | PagedMetadata


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    kv_cache: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """q [T, Hq, D], k and v [T, Hkv, D] -> [T, Hq, D]."""
    gqa = q.shape[1] != k.shape[1]
    if isinstance(meta, DenseCausal):
        shape = (meta.batch_size, meta.seq_len, -1, q.shape[-1])
        queries, keys, values = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(q.shape)
    assert kv_cache is not None, "paged attention needs the layer's KV cache"
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    kv_shape = (-1, *k_cache.shape[2:])
    k_cache.view(kv_shape).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(kv_shape).index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    if meta.decode_rows is not None:
        assert meta.decode_block_tables is not None
        keys = _gather_blocks(k_cache, meta.decode_block_tables).transpose(1, 2)
        values = _gather_blocks(v_cache, meta.decode_block_tables).transpose(1, 2)
        queries = q[meta.decode_rows].unsqueeze(2)
        decoded = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=meta.decode_mask, scale=scale, enable_gqa=gqa
        )
        out[meta.decode_rows] = decoded.squeeze(2)
    for chunk in meta.prefills:
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


def _gather_blocks(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """The cached tokens of the listed blocks, [..., blocks * block_size, kv_heads, head_dim].

    index_select is several times faster than advanced indexing for this gather on CPU.
    """
    gathered = cache.index_select(0, block_table.reshape(-1))
    return gathered.view(*block_table.shape[:-1], -1, *cache.shape[2:])
