"""State of one sequence (one completion of a request) as it moves through the scheduler."""

from __future__ import annotations

from enum import Enum

import torch

from engine.outputs import FinishReason, TokenLogprobs
from engine.sampling_params import SamplingParams
from engine.stop_strings import StopStrings
from engine.token_routing import TokenRouting
from engine.tokenizer import IncrementalDetokenizer


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Tokens (prompt then output), how many of them the KV cache holds, its blocks and its sampling state.

    A preempted sequence drops its blocks and resets num_computed_tokens; it is recomputed from its tokens.
    """

    def __init__(
        self,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        detokenizer: IncrementalDetokenizer,
        max_output_tokens: int,
        generator: torch.Generator | None = None,
        stop_strings: StopStrings | None = None,
        routing: TokenRouting | None = None,
    ) -> None:
        self.request_id = request_id
        self.index = index
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.max_output_tokens = max_output_tokens
        self.num_computed_tokens = 0
        # High-water mark of tokens whose expert routing was counted: recomputation is not counted twice.
        self.num_counted_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # prefix digests of full token blocks (tokens only grow: never stale)
        routing = routing or TokenRouting()
        self.cache_salt = routing.cache_salt  # seeds the first block's digest
        # False once its routing changed mid-way: its blocks then mix two routings and are offered to no one.
        self.shares_prefixes = True
        self.routing_rows = (routing.row(generated=False), routing.row(generated=True))  # a token's route controls
        self.num_registered_blocks = 0  # leading blocks of block_table already offered for prefix reuse
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None
        self.detokenizer = detokenizer
        self.output_text = ""
        self.output_logprobs: list[TokenLogprobs] = []
        # What DELTA outputs have given so far: characters of output_text, output tokens.
        self.sent_chars = 0
        self.sent_tokens = 0
        self.cumulative_logprob = 0.0
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None
        self.generator = generator
        self.stop_strings = stop_strings  # shared by a request's sequences; each keeps its own state
        self.stop_state = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def first_uncounted_token(self) -> int:
        """Position from which this step's routing is new: completions after the first share its prompt."""
        return self.num_counted_tokens if self.index == 0 else max(self.num_counted_tokens, self.num_prompt_tokens)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Only the first completion of a request computes prompt logprobs; they are shared by all."""
        return self.params.prompt_logprobs is not None and self.index == 0
