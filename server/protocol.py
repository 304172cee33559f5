"""The OpenAI-compatible wire format: request and response bodies, validated by pydantic.

Requests accept OpenAI's fields plus the sampling extras vLLM accepts in the same body (top_k, min_tokens,
ignore_eos, stop_token_ids, include_stop_str_in_output, skip_special_tokens). Unknown fields are refused, as
OpenAI refuses them, so a misspelled parameter never silently does nothing; and types are strict (no "16" for
16, no 14.0 for 14, no "yes" for true), so a client's mistake is named rather than guessed at. Parameters
accepted only at their neutral value say so in the schema. An integer field takes any JSON number with no
fraction (14.0 is 14, as JSON Schema reads its own "integer"), never 14.5, "14" or true. The per-request cost limits (server/request_limits.py)
are the server's flags and are checked after this shape.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from engine.limits import MAX_LOGPROBS
from engine.outputs import FinishReason
from engine.sampling_params import SamplingParams

MAX_N = 64


def _whole_number(value: object) -> object:
    """14.0 -> 14: JSON has one number type, and JSON Schema's integer is any number without a fraction."""
    return int(value) if type(value) is float and value.is_integer() else value


# With a strict int, `Annotated[int, Field(...), WHOLE]` takes no strings, booleans or fractions but does take
# integral JSON numbers such as 14.0 (the bounds still show in the JSON schema as minimum and maximum).
WHOLE = BeforeValidator(_whole_number)
TokenId = Annotated[int, Field(ge=0), WHOLE]


class StrictModel(BaseModel):
    """A request body part: unknown fields refused, no type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = False


def _requires(field: str, kind: str, then: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema rule: when `field` is given as `kind`, the body must also match `then`."""
    return {"if": {"required": [field], "properties": {field: {"type": kind}}}, "then": then}


STREAM_OPTIONS_RULE = _requires(
    "stream_options", "object", {"required": ["stream"], "properties": {"stream": {"const": True}}}
)


class Substitution(StrictModel):
    """Batch-aware expert substitution for this request's generated tokens (docs/pruning.md)."""

    keep_top: Annotated[int, Field(ge=0), WHOLE] | None = Field(
        None, description="Slots each token keeps as routed; its later slots may be re-routed. Absent: off."
    )
    min_similarity: Annotated[float, Field(ge=-1.0, le=1.0)] = Field(
        0.5, description="A slot moves only to an expert at least this similar (PES's cosine) to its own."
    )


class MoeRouting(StrictModel):
    """vLLM-style extra body `moe`: this request's routing budget. Absent fields keep the server's setting."""

    route_threshold: Annotated[float, Field(ge=0.0, lt=1.0)] | None = Field(
        None, description="Drop routed experts whose probability is below this."
    )
    experts_per_token: Annotated[int, Field(ge=1), WHOLE] | None = Field(
        None, description="Use at most this many of the model's top-k experts per token (null: all)."
    )
    substitution: Substitution | None = Field(
        None, description="Batch-aware substitution; null or {} turns the server's default off."
    )


class RoutingUpdate(MoeRouting):
    """POST /v1/routing: the fields given replace the server's routing setting from the next engine step."""

    prune_level: Annotated[float, Field(ge=0.0, lt=1.0)] | None = Field(
        None, description="Prune this share of experts (0: none) with prune_method, from its cached plan."
    )
    prune_method: str | None = Field(None, description="The pruning method of prune_level (moe-prune's methods).")
    prune_plan: str | None = Field(None, description="A plan file on the server (moe-prune plan) instead of a level.")


class RoutingSetting(BaseModel):
    """GET/POST /v1/routing: the routing budget requests without a `moe` field run under, and its generation
    (0 at start, one more per change)."""

    generation: int
    route_threshold: float
    experts_per_token: int | None
    substitution: Substitution | None
    prune_level: float = 0.0
    prune_method: str | None = None
    prune_plan: str | None = None


class _SamplingRequest(StrictModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(json_schema_extra={"allOf": [STREAM_OPTIONS_RULE]})

    model: str | None = Field(None, description="A served model name (GET /v1/models); defaults to the only one.")
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_N), WHOLE] = 1
    stop: str | list[Annotated[str, Field(min_length=1)]] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1), WHOLE] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="Accepted for compatibility; only 0.")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="Accepted for compatibility; only 0.")
    logit_bias: dict[str, float] | None = Field(
        None, max_length=0, description="Accepted for compatibility; must be empty."
    )
    # vLLM's extra sampling parameters.
    top_k: Annotated[int, Field(ge=-1), WHOLE] | None = Field(
        None, description="Keep the k most likely tokens; 0 or -1 disables."
    )
    min_tokens: Annotated[int, Field(ge=0), WHOLE] = 0
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    moe: MoeRouting | None = Field(None, description="This request's expert-routing budget (moe-serve's extra).")

    @model_validator(mode="after")
    def _supported(self) -> _SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    def _params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k or 0, 0),
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop if isinstance(self.stop, list) else ([self.stop] if self.stop else []),
            stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    ) = Field(description="Text, a batch of texts, token ids, or a batch of token-id lists (none empty).")
    max_tokens: Annotated[int, Field(ge=0), WHOLE] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), WHOLE] | None = None
    echo: bool = False
    best_of: Literal[1] | None = Field(None, description="Accepted for compatibility (as vLLM's V1 engine): only 1.")
    suffix: str | None = Field(None, max_length=0, description="Accepted for compatibility; must be empty.")
    forced_tokens: Annotated[list[TokenId], Field(min_length=1)] | None = Field(
        None,
        description="moe-serve's extra: generate exactly these tokens (max_tokens defaults to their number), so "
        "that logprobs score a continuation under generation-time routing (substitution acts on generated tokens).",
    )

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts this request carries, in order."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    def sampling_params(self) -> SamplingParams:
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        if self.forced_tokens is None:
            return self._params(self.max_tokens, self.logprobs, prompt_logprobs)
        max_tokens = self.max_tokens if "max_tokens" in self.model_fields_set else len(self.forced_tokens)
        params = self._params(max_tokens, self.logprobs, prompt_logprobs)
        return replace(params, forced_tokens=list(self.forced_tokens))


class TextContent(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContent] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                STREAM_OPTIONS_RULE,
                _requires(
                    "top_logprobs", "integer", {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}
                ),
            ]
        }
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1), WHOLE] | None = Field(
        None, description="Deprecated alias of the next field."
    )
    max_completion_tokens: Annotated[int, Field(ge=1), WHOLE] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), WHOLE] | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _chat_supported(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    def sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._params(max_tokens, logprobs, None)


# ----- responses -----


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions logprobs shape (what evaluation harnesses read)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = Field(None, description="The stop string or token id that ended it (vLLM).")


def _now() -> int:
    return int(time.time())


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    """A streamed chat chunk's delta; fields not set are left out (the last chunk's delta is {}, as OpenAI's)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, serialize: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in serialize(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moe-serve"
    root: str = Field(description="The model directory it was loaded from.")
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""

    error: ErrorDetail


class HealthResponse(BaseModel):
    status: str
    engine_silent_s: float | None = Field(None, description="Seconds since the engine process was last heard from.")


class LayerLoad(BaseModel):
    layer: int
    routed_tokens: list[int] = Field(description="Tokens routed to each expert, by original expert id.")
    max_over_mean: float | None = Field(description="Busiest expert / mean; null when the layer routed nothing.")
    coefficient_of_variation: float | None
    idle_experts: int | None = Field(description="Experts that received no tokens; null when nothing was routed.")
    experts_read_per_step: float | None = Field(
        description="Mean distinct experts a forward step read in this layer (the union of its tokens' experts, "
        "what batch-aware substitution lowers); null before the first step."
    )
    experts_per_token: float | None = Field(
        description="Mean experts a token actually used in this layer, after thresholds, per-token budgets, "
        "substitution's merged slots and dropped slots; null before the first token."
    )


class LoadPeriod(BaseModel):
    since: float = Field(description="Unix time the period started.")
    total_routed_slots: int = Field(
        description="(token, expert) routing slots summed over experts and MoE layers: about tokens x experts per "
        "token x MoE layers, not a token count."
    )
    total_routed: int = Field(description="The same as total_routed_slots (its old name).", deprecated=True)
    layers: list[LayerLoad]


class ExpertLoadResponse(BaseModel):
    """GET /v1/experts/load: routed-token counts per MoE layer and expert, since start and since a reset."""

    model: str
    balancing_method: str = Field(description="How the router was balanced in training (unknown: not recorded).")
    num_experts: int
    top_k: int = Field(description="The checkpoint's experts per token.")
    experts_per_token: int = Field(description="Experts per token as served (top_k, or the server's override).")
    pruning: dict[str, str] = Field(
        description="The pruning served now: prune_method, prune_level, prune_plan (as GET /v1/routing)."
    )
    since_start: LoadPeriod
    since_reset: LoadPeriod
