"""Device work for one engine step: owns the KV cache and the step's input buffers, runs the model, samples.

A step's tokens are laid out decodes first (one row per sequence), then prefill chunks, in buffers allocated
once for the largest step, so building a step writes into numpy views instead of creating tensors from lists.
The forward is the model itself (`enforce_eager`) or its compiled form (engine/compiled.py): on CPU one
graph with a symbolic token count serves every step (and one more for one-token steps); on CUDA in bf16,
decode-only steps are padded to the next size of a ladder and replayed from CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from engine.attention import DenseCausal, PagedStep, PrefillChunk, paged_step
from engine.compiled import CompiledForward
from engine.model import MoEForCausalLM
from engine.native_ops import native_ops
from engine.sampler import sample, token_logprobs
from engine.scheduler import ModelRunnerOutput, ScheduledSequence, SchedulerOutput
from engine.token_routing import NUM_CONTROLS


def kv_cache_bytes_per_block(model: MoEForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    config = model.config
    element = torch.tensor([], dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * element


def kv_cache_blocks(
    model: MoEForCausalLM, block_size: int, budget_bytes: int, max_num_seqs: int, max_model_len: int
) -> int:
    """How many KV blocks a budget of bytes holds, never more than every sequence at full length could use."""
    per_block = kv_cache_bytes_per_block(model, block_size, model.lm_head.weight.dtype)
    most = max_num_seqs * -(-max_model_len // block_size)
    return max(0, min(budget_bytes // per_block, most))


@torch.inference_mode()
def cuda_kv_cache_budget(model: MoEForCausalLM, max_step_tokens: int, gpu_memory_utilization: float) -> int:
    """vLLM's rule: gpu_memory_utilization of total memory, less memory outside torch and the peak of a
    forward pass over a full token budget (weights plus activations, logits and logprobs of every row)."""
    device = model.lm_head.weight.device
    torch.cuda.reset_peak_memory_stats(device)
    positions = torch.arange(max_step_tokens, device=device)
    hidden = model(torch.zeros_like(positions), positions, DenseCausal(1, max_step_tokens))
    torch.log_softmax(model.compute_logits(hidden), dim=-1)
    torch.cuda.synchronize(device)
    model.expert_load.reset()
    peak = torch.cuda.max_memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    outside_torch = total - free - torch.cuda.memory_reserved(device)
    return int(total * gpu_memory_utilization) - outside_torch - peak


@dataclass
class _Layout:
    """Where one step's rows came from: the schedule index of each row's sequence, and what each row needs."""

    order: list[int]  # schedule indices, decodes first
    num_decodes: int
    num_tokens: int
    decode_width: int  # blocks the longest decode sequence spans
    prefills: tuple[PrefillChunk, ...]
    sample_rows: list[int]
    sample_items: list[int]  # schedule indices of the sampled rows
    prompt_rows: list[int]
    prompt_targets: list[tuple[int, int]]  # (schedule index, target token)


class StepBuffers:
    """Host buffers for the largest step, filled in place each step (numpy views for cheap element writes)."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, pin: bool) -> None:
        def buffer(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int64, pin_memory=pin)

        self.input_ids, self.positions = buffer(max_tokens), buffer(max_tokens)
        self.slot_mapping, self.token_mask = buffer(max_tokens), buffer(max_tokens)
        self.block_tables, self.seq_lens = buffer(max_seqs, max_blocks), buffer(max_seqs)
        # Each row's routing budget (engine.routing.TokenRouting.row).
        self.route_controls = torch.zeros(max_tokens, NUM_CONTROLS, dtype=torch.float32, pin_memory=pin)
        self.np = {name: getattr(self, name).numpy() for name in vars(self).copy()}

    def inputs(self) -> tuple[torch.Tensor, ...]:
        """The forward's per-row inputs, in its argument order (engine.compiled)."""
        return self.input_ids, self.positions, self.token_mask, self.route_controls


class ModelRunner:
    """Runs scheduled sequences through the model over a paged KV cache of num_blocks blocks."""

    def __init__(
        self,
        model: MoEForCausalLM,
        num_blocks: int,
        block_size: int,
        eos_token_ids: tuple[int, ...],
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enforce_eager: bool = True,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.eos_token_ids = eos_token_ids
        config = model.config
        weight = model.lm_head.weight
        self.device = weight.device
        # One spare block beyond what the block manager hands out, for the padding rows of CUDA graphs. Zeroed,
        # not empty: padded decode gathers read unused slots, and 0 * NaN would poison attention.
        shape = (2, num_blocks + 1, block_size, config.num_kv_heads, config.head_dim)
        self.kv_caches = [
            torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(config.num_layers)
        ]
        max_blocks = -(-max_model_len // block_size)
        self.max_tokens = max(max_num_batched_tokens, max_num_seqs)
        self.buffers = StepBuffers(self.max_tokens, max_num_seqs, max_blocks, pin=self.device.type == "cuda")
        if self.device.type == "cpu":
            native_ops()  # built (or found) and registered now, before the forward is traced
        self.forward = CompiledForward(model, self.kv_caches, max_num_seqs, max_blocks, enforce_eager)

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput, decode_token: Callable[[int], str | None]) -> ModelRunnerOutput:
        """One forward pass over the scheduled tokens; sample where a sequence reached its last token."""
        batch = scheduled.scheduled
        layout = self._prepare(batch)
        hidden = self._run(layout)
        count = len(batch)
        output = ModelRunnerOutput([None] * count, [None] * count, [None] * count)
        if layout.sample_rows:
            self._sample(batch, hidden, layout, output, decode_token)
        if layout.prompt_rows:
            logits = self.forward.logits(hidden[torch.tensor(layout.prompt_rows, device=hidden.device)])
            top_n = [batch[item].seq.params.prompt_logprobs or 0 for item, _ in layout.prompt_targets]
            entries = token_logprobs(logits, [t for _, t in layout.prompt_targets], top_n, decode_token)
            for (item, _), entry in zip(layout.prompt_targets, entries):
                output.prompt_logprobs[item] = (output.prompt_logprobs[item] or []) + [entry]
        return output

    def _prepare(self, batch: list[ScheduledSequence]) -> _Layout:
        """Lay the scheduled tokens out in the step buffers, decodes first, and say what each row needs."""
        np_ = self.buffers.np
        ids, positions, slots, mask = np_["input_ids"], np_["positions"], np_["slot_mapping"], np_["token_mask"]
        controls = np_["route_controls"]
        bs = self.block_size
        decodes = [i for i, item in enumerate(batch) if item.num_new_tokens == 1]
        order = decodes + [i for i, item in enumerate(batch) if item.num_new_tokens != 1]
        layout = _Layout(order, len(decodes), 0, 0, (), [], [], [], [])
        prefills = []
        row = 0
        for item_index in order:
            seq, n = batch[item_index].seq, batch[item_index].num_new_tokens
            start, end, table = seq.num_computed_tokens, seq.num_computed_tokens + n, seq.block_table
            counted_from = seq.first_uncounted_token
            if n == 1:
                ids[row], positions[row] = seq.token_ids[start], start
                slots[row] = table[start // bs] * bs + start % bs
                mask[row] = start >= counted_from
                controls[row] = seq.routing_rows[start >= seq.num_prompt_tokens]
                blocks = -(-end // bs)
                np_["block_tables"][row, :blocks] = table[:blocks]
                np_["seq_lens"][row] = end
                layout.decode_width = max(layout.decode_width, blocks)
            else:
                ids[row : row + n] = seq.token_ids[start:end]
                positions[row : row + n] = np.arange(start, end)
                span = np.arange(start, end)
                slots[row : row + n] = np.asarray(table, dtype=np.int64)[span // bs] * bs + span % bs
                mask[row : row + n] = span >= counted_from
                controls[row : row + n] = seq.routing_rows[False]
                block_table = torch.tensor(table[: -(-end // bs)], dtype=torch.long, device=self.device)
                prefills.append(PrefillChunk(row, n, end, block_table))
            if end == seq.num_tokens:
                layout.sample_rows.append(row + n - 1)
                layout.sample_items.append(item_index)
            if seq.wants_prompt_logprobs:
                recorded = len(seq.prompt_logprobs or [None])
                for target in range(max(start + 1, recorded), min(end + 1, seq.num_prompt_tokens)):
                    layout.prompt_rows.append(row + target - 1 - start)
                    layout.prompt_targets.append((item_index, seq.token_ids[target]))
            row += n
        layout.num_tokens = row
        layout.prefills = tuple(prefills)
        return layout

    def _run(self, layout: _Layout) -> torch.Tensor:
        """The forward pass over the laid-out rows: final hidden states [T, H]."""
        b, t = self.buffers, layout.num_tokens
        if not layout.prefills and self.forward.replays(layout.num_decodes):
            return self.forward.replay_decode(b, layout.num_decodes)
        move = self._on_device
        step = PagedStep(
            kv_caches=self.kv_caches,
            slot_mapping=move(b.slot_mapping[:t]),
            num_decodes=layout.num_decodes,
            decode_block_tables=move(b.block_tables[: layout.num_decodes]),
            decode_seq_lens=move(b.seq_lens[: layout.num_decodes]),
            decode_width=layout.decode_width,
            prefills=layout.prefills,
        )
        inputs = [move(x[:t]) for x in b.inputs()]
        with paged_step(step):
            return self.forward(*inputs)

    def _on_device(self, x: torch.Tensor) -> torch.Tensor:
        """A host buffer's rows where the model runs (the buffer itself on the CPU: `.to` costs 1-2 us a call)."""
        return x if self.device.type == "cpu" else x.to(self.device, non_blocking=True)

    def _sample(
        self,
        batch: list[ScheduledSequence],
        hidden: torch.Tensor,
        layout: _Layout,
        output: ModelRunnerOutput,
        decode_token: Callable[[int], str | None],
    ) -> None:
        items = layout.sample_items
        seqs = [batch[item].seq for item in items]
        rows = layout.sample_rows
        if rows == list(range(len(rows))):  # decode-only steps: the first rows, no gather
            logits = self.forward.logits(hidden[: len(rows)])
        else:
            logits = self.forward.logits(hidden[torch.tensor(rows, device=hidden.device)])
        tokens = sample(logits, seqs, self.eos_token_ids).tolist()
        wanting = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
        if wanting:
            top_n = [seqs[i].params.logprobs or 0 for i in wanting]
            entries = token_logprobs(logits[wanting], [tokens[i] for i in wanting], top_n, decode_token)
            for i, entry in zip(wanting, entries):
                output.logprobs[items[i]] = entry
        for i, item in enumerate(items):
            output.tokens[item] = tokens[i]

    def warm_up(self, progress: Callable[[str], None] | None = None) -> float:
        """Compile (and on CUDA capture) the forward before serving; seconds it took."""
        return self.forward.warm_up(self.buffers, progress)

    def experts_moved(self) -> None:
        """Expert weights were freed or read back (live pruning): see CompiledForward.experts_moved."""
        self.forward.experts_moved()

    def reset_compiled(self) -> None:
        """Routing changed: compiled graphs specialized on the old routing are dropped."""
        self.forward.reset()
