"""What a request may ask of a loaded model: checked by the engine, and by the server before admission.

One function, so that the HTTP process refuses exactly what the engine would refuse, with the same message,
before the request costs the engine anything.
"""

from __future__ import annotations

from engine.sampling_params import InvalidRequestError, SamplingParams

MAX_LOGPROBS = 20


def check_request(
    token_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int, max_logprobs: int = MAX_LOGPROBS
) -> None:
    """Raise InvalidRequestError (naming the field and the numbers) if the prompt and params can never run."""
    if not token_ids:
        raise InvalidRequestError("prompt must contain at least one token", "prompt")
    bad = next((t for t in token_ids if type(t) is not int or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"prompt token id {bad!r} is outside the vocabulary (0..{vocab_size - 1})", "prompt")
    bad = next((t for t in params.stop_token_ids if t >= vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(
            f"stop_token_ids holds {bad}, outside the vocabulary (0..{vocab_size - 1})", "stop_token_ids"
        )
    bad = next((t for t in params.forced_tokens or [] if t >= vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(
            f"forced_tokens holds {bad}, outside the vocabulary (0..{vocab_size - 1})", "forced_tokens"
        )
    most = min(max_logprobs, vocab_size)
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and value > most:
            raise InvalidRequestError(f"{name} must be at most {most}, got {value}", name)
    wanted = len(token_ids) + (params.max_tokens if params.max_tokens is not None else 1)
    if wanted > max_model_len:
        raise InvalidRequestError(
            f"prompt ({len(token_ids)} tokens) plus max_tokens ({params.max_tokens}) is {wanted} tokens, "
            f"more than the maximum context length of {max_model_len}",
            "max_tokens",
        )
