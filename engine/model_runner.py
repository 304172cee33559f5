"""Device work for one engine step: owns the KV cache, builds the batch, runs the model, samples."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.attention import PagedMetadata, PrefillChunk
from engine.model import MoEForCausalLM
from engine.outputs import TokenLogprobs
from engine.sampler import sample, token_logprobs
from engine.scheduler import ScheduledSequence


@dataclass
class SequenceStepResult:
    """What one step produced for one scheduled sequence."""

    token: int | None = None
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None


def kv_cache_bytes_per_block(model: MoEForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    config = model.config
    element = torch.tensor([], dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * element


class ModelRunner:
    """Runs scheduled sequences through the model over a paged KV cache of num_blocks blocks."""

    def __init__(self, model: MoEForCausalLM, num_blocks: int, block_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self.model = model
        self.block_size = block_size
        self.eos_token_ids = eos_token_ids
        config = model.config
        weight = model.lm_head.weight
        shape = (2, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        # Zeroed, not empty: padded decode gathers read unused slots, and 0 * NaN would poison attention.
        self.kv_caches = [
            torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(config.num_layers)
        ]
        self.device = weight.device

    @torch.inference_mode()
    def execute(
        self, batch: list[ScheduledSequence], decode_token: Callable[[int], str | None]
    ) -> list[SequenceStepResult]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        sample_rows: list[int] = []
        sample_items: list[int] = []
        prompt_rows: list[int] = []
        prompt_targets: list[tuple[int, int]] = []  # (batch item, target token)
        counted: list[int] = []  # 1 where this token's expert routing is counted in the load statistics
        bs = self.block_size
        for item, scheduled in enumerate(batch):
            seq, n = scheduled.seq, scheduled.num_new_tokens
            start, row = seq.num_computed_tokens, len(input_ids)
            end = start + n
            table = seq.block_table
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            counted += [int(p >= seq.first_uncounted_token) for p in range(start, end)]
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            if n == 1:
                decode_rows.append(row)
                decode_tables.append(table[: -(-end // bs)])
                decode_lens.append(end)
            else:
                block_table = torch.tensor(table[: -(-end // bs)], dtype=torch.long, device=self.device)
                prefills.append(PrefillChunk(row, n, end, block_table))
            if end == seq.num_tokens:
                sample_rows.append(row + n - 1)
                sample_items.append(item)
            if seq.wants_prompt_logprobs:
                recorded = len(seq.prompt_logprobs or [None])
                for target in range(max(start + 1, recorded), min(end + 1, seq.num_prompt_tokens)):
                    prompt_rows.append(row + target - 1 - start)
                    prompt_targets.append((item, seq.token_ids[target]))

        meta = PagedMetadata(
            slot_mapping=self._tensor(slots),
            decode_rows=self._tensor(decode_rows) if decode_rows else None,
            decode_block_tables=self._padded(decode_tables) if decode_rows else None,
            decode_mask=self._decode_mask(decode_lens) if decode_rows else None,
            prefills=tuple(prefills),
        )
        self.model.expert_load.token_mask = None if all(counted) else self._tensor(counted)
        hidden = self.model(self._tensor(input_ids), self._tensor(positions), meta, self.kv_caches)
        results = [SequenceStepResult() for _ in batch]
        if sample_rows:
            self._sample(batch, hidden, sample_rows, sample_items, results, decode_token)
        if prompt_rows:
            logits = self.model.compute_logits(hidden[self._tensor(prompt_rows)])
            top_n = [batch[item].seq.params.prompt_logprobs or 0 for item, _ in prompt_targets]
            entries = token_logprobs(logits, [t for _, t in prompt_targets], top_n, decode_token)
            for (item, _), entry in zip(prompt_targets, entries):
                results[item].prompt_logprobs = (results[item].prompt_logprobs or []) + [entry]
        return results

    def _sample(
        self,
        batch: list[ScheduledSequence],
        hidden: torch.Tensor,
        rows: list[int],
        items: list[int],
        results: list[SequenceStepResult],
        decode_token: Callable[[int], str | None],
    ) -> None:
        seqs = [batch[item].seq for item in items]
        logits = self.model.compute_logits(hidden[self._tensor(rows)])
        tokens = sample(logits, seqs, self.eos_token_ids).tolist()
        wanting = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
        if wanting:
            top_n = [seqs[i].params.logprobs or 0 for i in wanting]
            entries = token_logprobs(logits[wanting], [tokens[i] for i in wanting], top_n, decode_token)
            for i, entry in zip(wanting, entries):
                results[items[i]].logprobs = entry
        for i, item in enumerate(items):
            results[item].token = tokens[i]

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _padded(self, tables: list[list[int]]) -> torch.Tensor:
        width = max(len(t) for t in tables)
        return self._tensor([t + [0] * (width - len(t)) for t in tables]).view(len(tables), width)

    def _decode_mask(self, context_lens: list[int]) -> torch.Tensor:
        width = -(-max(context_lens) // self.block_size) * self.block_size
        lens = self._tensor(context_lens)
        return (torch.arange(width, device=self.device)[None, :] < lens[:, None])[:, None, None, :]
