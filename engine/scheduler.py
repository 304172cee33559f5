"""Continuous batching: which sequences run this step, and how many of their tokens; and each sequence's state
after the step. The scheduler owns that state: schedule -> (the model runner executes) -> update_from_output.

Each step spends a token budget: running sequences first (one token per decode, the next chunk of an
unfinished prefill), then newly admitted prefills, chunked to fit. When the KV cache cannot hold a running
sequence's next tokens, the most recently admitted sequence is preempted (its blocks freed, recomputed
later). A sequence always fits alone (the engine rejects prompts that could not), so this never deadlocks.
After the step, update_from_output advances each sequence, appends its sampled token and finishes it on an
end-of-sequence or stop token or at its length limit; stop strings, which need text, are the engine's.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.outputs import FinishReason, TokenLogprobs
from engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)


@dataclass
class ModelRunnerOutput:
    """What one step computed, per scheduled sequence in schedule order."""

    tokens: list[int | None]  # the sampled token, None where the sequence did not reach its last token
    logprobs: list[TokenLogprobs | None]
    prompt_logprobs: list[list[TokenLogprobs] | None]


class Scheduler:
    """Waiting and running queues over a block manager, bounded by max_num_seqs and max_num_batched_tokens."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int = 1 << 62,
        eos_token_ids: tuple[int, ...] = (),
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Mark seq finished with reason and free its blocks, wherever it is queued."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.can_allocate(seq, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break
            self.block_manager.allocate(seq, num_new)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
            i += 1
        while not out.preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self.block_manager.cached_prefix(seq)
            num_new = min(seq.num_tokens - len(cached) * self.block_manager.block_size, budget)
            if not self.block_manager.can_admit(seq, cached, num_new):
                break
            self.waiting.popleft()
            seq.num_computed_tokens = self.block_manager.admit(seq, cached, num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        return out

    def update_from_output(self, scheduled: SchedulerOutput, output: ModelRunnerOutput) -> list[Sequence]:
        """Advance every scheduled sequence past its computed tokens, append the sampled ones, and finish those
        that stop (end-of-sequence or stop token past min_tokens, max_tokens, the context length). Returns the
        sequences that received a token or finished, in schedule order."""
        stepped = []
        for item, token, logprobs, prompt_logprobs in zip(
            scheduled.scheduled, output.tokens, output.logprobs, output.prompt_logprobs
        ):
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            seq.num_counted_tokens = max(seq.num_counted_tokens, seq.num_computed_tokens)
            self.block_manager.register_full_blocks(seq)
            if prompt_logprobs and seq.prompt_logprobs is not None:
                seq.prompt_logprobs.extend(prompt_logprobs)
            if token is None:
                continue
            stepped.append(seq)
            if seq.max_output_tokens == 0:  # prompt logprobs only: nothing is generated
                self.finish(seq, "length")
                continue
            self._append(seq, token, logprobs)
        return stepped

    def _append(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None) -> None:
        seq.token_ids.append(token)
        if logprobs is not None:
            seq.output_logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token].logprob
        params = seq.params
        past_min = seq.num_output_tokens >= params.min_tokens
        if past_min and not params.ignore_eos and token in self.eos_token_ids:
            self.finish(seq, "stop")
        elif past_min and token in params.stop_token_ids:
            seq.stop_reason = token
            self.finish(seq, "stop")
        elif seq.num_output_tokens >= seq.max_output_tokens or seq.num_tokens >= self.max_model_len:
            self.finish(seq, "length")

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
