"""The bounds on what one request may cost: each is a `moe-serve` flag, and each refusal is a 400 naming it.

Together with the body size limit they bound the work a single client can put on the server before it is
admitted (parsing, tokenizing, template rendering) and after (sequences, prompt tokens, stop-string and
logprob bookkeeping per token), so that no request can stall the others.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from engine.limits import MAX_LOGPROBS


@dataclass(frozen=True)
class RequestLimits:
    """Per-request cost bounds; the field names are the flags' (with dashes), so messages can name them."""

    max_prompts_per_request: int = 128  # prompts in one completions request
    max_prompt_tokens_per_request: int = 131072  # all of a request's prompts together
    max_sequences_per_request: int = 256  # prompts x n
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_logprobs: int = MAX_LOGPROBS  # top logprobs per token (logprobs, top_logprobs)
    chat_template_timeout: float = 5.0  # seconds a chat template may take to render

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not value > 0:
                raise ValueError(f"--{flag(item.name)} must be positive, got {value!r}")
        if self.max_logprobs > MAX_LOGPROBS:
            raise ValueError(f"--max-logprobs must be at most {MAX_LOGPROBS}, got {self.max_logprobs}")


def flag(name: str) -> str:
    """The command-line flag of a RequestLimits field."""
    return name.replace("_", "-")
