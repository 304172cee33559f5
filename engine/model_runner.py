"""Device work for one engine step: owns the KV cache, builds the batch, runs the model, samples."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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


@dataclass
class _StepBatch:
    """One step's tokens flattened into rows, with what the forward pass and the sampler need to know."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    counted: list[int] = field(default_factory=list)  # 1 where the token's expert routing is counted
    decode_rows: list[int] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    sample_items: list[int] = field(default_factory=list)
    prompt_rows: list[int] = field(default_factory=list)
    prompt_targets: list[tuple[int, int]] = field(default_factory=list)  # (batch item, target token)


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
        """One forward pass over the scheduled tokens; sample where a sequence reached its last token."""
        step, meta = self._prepare(batch)
        self.model.expert_load.token_mask = None if all(step.counted) else self._tensor(step.counted)
        hidden = self.model(self._tensor(step.input_ids), self._tensor(step.positions), meta, self.kv_caches)
        results = [SequenceStepResult() for _ in batch]
        if step.sample_rows:
            self._sample(batch, hidden, step.sample_rows, step.sample_items, results, decode_token)
        if step.prompt_rows:
            logits = self.model.compute_logits(hidden[self._tensor(step.prompt_rows)])
            top_n = [batch[item].seq.params.prompt_logprobs or 0 for item, _ in step.prompt_targets]
            entries = token_logprobs(logits, [t for _, t in step.prompt_targets], top_n, decode_token)
            for (item, _), entry in zip(step.prompt_targets, entries):
                results[item].prompt_logprobs = (results[item].prompt_logprobs or []) + [entry]
        return results

    def _prepare(self, batch: list[ScheduledSequence]) -> tuple[_StepBatch, PagedMetadata]:
        """Flatten the scheduled tokens and say where their keys go, what they attend to, what is sampled."""
        step = _StepBatch()
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        bs = self.block_size
        for item, scheduled in enumerate(batch):
            seq, n = scheduled.seq, scheduled.num_new_tokens
            start, row = seq.num_computed_tokens, len(step.input_ids)
            end = start + n
            table = seq.block_table
            step.input_ids += seq.token_ids[start:end]
            step.positions += range(start, end)
            first_uncounted = seq.first_uncounted_token
            step.counted += [int(p >= first_uncounted) for p in range(start, end)]
            step.slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            if n == 1:
                step.decode_rows.append(row)
                decode_tables.append(table[: -(-end // bs)])
                decode_lens.append(end)
            else:
                block_table = torch.tensor(table[: -(-end // bs)], dtype=torch.long, device=self.device)
                prefills.append(PrefillChunk(row, n, end, block_table))
            if end == seq.num_tokens:
                step.sample_rows.append(row + n - 1)
                step.sample_items.append(item)
            if seq.wants_prompt_logprobs:
                recorded = len(seq.prompt_logprobs or [None])
                for target in range(max(start + 1, recorded), min(end + 1, seq.num_prompt_tokens)):
                    step.prompt_rows.append(row + target - 1 - start)
                    step.prompt_targets.append((item, seq.token_ids[target]))
        meta = PagedMetadata(
            slot_mapping=self._tensor(step.slots),
            decode_rows=self._tensor(step.decode_rows) if step.decode_rows else None,
            decode_block_tables=self._padded(decode_tables) if decode_tables else None,
            decode_mask=self._decode_mask(decode_lens) if decode_lens else None,
            prefills=tuple(prefills),
        )
        return step, meta

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
        padded = [t + [0] * (width - len(t)) for t in tables]
        return torch.tensor(padded, dtype=torch.long, device=self.device)

    def _decode_mask(self, context_lens: list[int]) -> torch.Tensor:
        width = -(-max(context_lens) // self.block_size) * self.block_size
        lens = self._tensor(context_lens)
        return (torch.arange(width, device=self.device)[None, :] < lens[:, None])[:, None, None, :]
