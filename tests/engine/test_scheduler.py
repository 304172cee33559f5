"""Block accounting and scheduling decisions, without a model."""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus
from engine.tokenizer import IncrementalDetokenizer


def make_seq(request_id: str, prompt_len: int) -> Sequence:
    detokenizer: IncrementalDetokenizer = None  # type: ignore[assignment]  # never used without a model
    return Sequence(request_id, 0, list(range(prompt_len)), SamplingParams(), detokenizer, max_output_tokens=100)


def test_block_manager_allocates_and_frees() -> None:
    blocks = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq("a", 6)
    assert blocks.extra_blocks_needed(seq, 6) == 2
    blocks.allocate(seq, 6)
    assert len(seq.block_table) == 2 and blocks.num_free_blocks == 2 and blocks.usage == 0.5
    seq.num_computed_tokens = 6
    assert blocks.extra_blocks_needed(seq, 2) == 0 and blocks.extra_blocks_needed(seq, 3) == 1
    with pytest.raises(RuntimeError, match="KV blocks needed"):
        blocks.allocate(seq, 13)
    blocks.free(seq)
    assert seq.block_table == [] and blocks.num_free_blocks == 4


def test_budget_chunks_prefills_and_caps_sequences() -> None:
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=10)
    for i, n in enumerate((7, 7, 7)):
        scheduler.add(make_seq(str(i), n))
    first = scheduler.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in first.scheduled] == [("0", 7), ("1", 3)]
    assert len(scheduler.running) == 2 and len(scheduler.waiting) == 1  # max_num_seqs holds the third back
    for item in first.scheduled:
        item.seq.num_computed_tokens += item.num_new_tokens
    first.scheduled[0].seq.token_ids.append(1)  # "0" finished its prompt and sampled a token
    second = scheduler.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in second.scheduled] == [("0", 1), ("1", 4)]


def test_preemption_frees_the_newest_and_requeues_it_first() -> None:
    scheduler = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=64)
    old, new = make_seq("old", 8), make_seq("new", 8)
    scheduler.add(old)
    scheduler.add(new)
    for item in scheduler.schedule().scheduled:
        item.seq.num_computed_tokens += item.num_new_tokens
        item.seq.token_ids.append(1)  # each sampled one token: both need a third block now
    out = scheduler.schedule()
    assert out.preempted == [new] and [s.seq for s in out.scheduled] == [old]
    assert new.status == SequenceStatus.WAITING and new.num_computed_tokens == 0 and new.block_table == []
    assert scheduler.waiting[0] is new and scheduler.num_preemptions == 1
