"""Request bodies to engine-ready requests, in a pool of worker processes: parse, validate, render, tokenize,
check against the model and the per-request limits.

All of a request's CPU work before admission happens here, never on the event loop and never in the engine
process: a 4 MiB body of 700,000 prompts or a million-word string costs one worker a moment, while every other
stream goes on. Workers are processes, not threads, because JSON parsing and validation hold the GIL; they
import no torch. What comes back is small (the limits bound it) or an error naming the field or the flag.

A prompt whose characters could not fit the context even at the tokenizer's longest token per token is refused
before it is tokenized. Chat templates render with a time bound (a SIGALRM timer in the worker) and a size
bound, after a dry run at start-up that refuses a template which cannot render a sample conversation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from engine.config import ModelConfig
from engine.limits import check_request
from engine.sampling_params import InvalidRequestError, SamplingParams
from engine.token_routing import TokenRouting
from engine.tokenizer import ModelTokenizer
from server.chat_template import ChatTemplate, ChatTemplateError, RenderTimeout
from server.child_process import become_child
from server.protocol import ChatCompletionRequest, CompletionRequest, MoeRouting
from server.request_limits import RequestLimits, flag

logger = logging.getLogger(__name__)
# Characters a prompt may have per token of context before it is refused untokenized: the tokenizer's
# longest token, times this slack for normalizers that drop characters.
CHARS_SLACK = 2
START_TIMEOUT_S = 120.0
WORKER_NAME = "moe-serve-request"  # what ps shows (as "moe-serve-reque")


@dataclass(frozen=True)
class ModelBounds:
    """What the workers check requests against, beyond the RequestLimits."""

    model_name: str  # the served name clients send as `model`
    vocab_size: int
    max_model_len: int
    capacity: int  # sequences the server can hold at once (a batch plus the queue)
    top_k: int = 1  # the model's experts per token
    routing: TokenRouting = field(
        default_factory=TokenRouting
    )  # every request's routing unless its `moe` field changes it
    allow_request_routing: bool = True
    substitution_available: bool = False  # the engine holds the experts' similarity maps


@dataclass(frozen=True)
class RequestError:
    """A refusal, as the HTTP error it becomes (picklable, unlike the exceptions it stands for)."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    type: str = "invalid_request_error"


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request, tokenized: what the engine will run, plus the body for shaping the response."""

    body: CompletionRequest | ChatCompletionRequest
    prompts: list[list[int]]
    prompt_texts: list[str | None]  # each prompt's text when it was given as text (for echo)
    params: SamplingParams


class Refused(Exception):
    """Raised inside a worker; becomes the RequestError it carries."""

    def __init__(self, error: RequestError) -> None:
        super().__init__(error.message)
        self.error = error


def _bad(message: str, param: str | None = None, code: str | None = None) -> Refused:
    return Refused(RequestError(400, message, param, code))


def merged_routing(base: TokenRouting, moe: MoeRouting, bounds: ModelBounds, prefix: str = "") -> TokenRouting:
    """`base` with the fields `moe` gives replaced, checked against the model (Refused naming prefix + field)."""
    given = moe.model_fields_set
    routing = base
    if "route_threshold" in given:
        routing = replace(routing, min_prob=moe.route_threshold or 0.0)
    if "experts_per_token" in given:
        if moe.experts_per_token is not None and moe.experts_per_token > bounds.top_k:
            raise _bad(
                f"{prefix}experts_per_token must be at most the model's {bounds.top_k} experts per token, "
                f"got {moe.experts_per_token}",
                f"{prefix}experts_per_token",
            )
        routing = replace(routing, experts_per_token=moe.experts_per_token)
    if "substitution" in given:
        substitution = moe.substitution
        keep_top = None if substitution is None else substitution.keep_top
        if keep_top is not None and keep_top > bounds.top_k:
            raise _bad(
                f"{prefix}substitution.keep_top must be at most the model's {bounds.top_k} experts per token, "
                f"got {keep_top}",
                f"{prefix}substitution.keep_top",
            )
        if keep_top is not None and not bounds.substitution_available:
            raise _bad(
                "substitution needs the experts' similarity maps; start the server with --substitution-keep-top "
                "or --similarity-maps",
                f"{prefix}substitution",
            )
        similarity = routing.min_similarity if substitution is None else substitution.min_similarity
        routing = replace(routing, keep_top=keep_top, min_similarity=similarity)
    return routing


# ----- in the worker processes -----


class _Worker:
    """One worker process's state: the tokenizer, the chat template and the bounds."""

    def __init__(self, model_path: Path, limits: RequestLimits, bounds: ModelBounds) -> None:
        config = ModelConfig.from_dir(model_path)
        self.tokenizer = ModelTokenizer(model_path, config.eos_token_ids)
        self.template = ChatTemplate.from_model_dir(model_path, self.tokenizer.tokenizer_config)
        self.limits = limits
        self.bounds = bounds
        longest = max((len(symbol) for symbol in self.tokenizer.hf.get_vocab(with_added_tokens=True)), default=1)
        self.max_prompt_chars = bounds.max_model_len * max(longest, 1) * CHARS_SLACK

    def prepare(self, kind: str, body: bytes) -> PreparedRequest:
        raw = _parse_json(body)
        if kind == "completion":
            _precheck_prompt(raw.get("prompt"), self.limits)
        _refuse_unencodable(raw, "")
        model = CompletionRequest if kind == "completion" else ChatCompletionRequest
        request: CompletionRequest | ChatCompletionRequest = _validate(model, raw)
        if request.model is not None and request.model != self.bounds.model_name:
            raise Refused(RequestError(404, f"The model '{request.model}' does not exist", "model", "model_not_found",
                                       "not_found_error"))  # fmt: skip
        try:
            params = request.sampling_params()
        except InvalidRequestError as exc:
            raise _bad(str(exc), exc.param) from exc
        self._check_params(request, params)
        params.routing = self._routing(request)
        if isinstance(request, CompletionRequest):
            texts = [p if isinstance(p, str) else None for p in request.prompts()]
            prompts = [self._tokens(p) for p in request.prompts()]
        else:
            text = self._render(request)
            texts = [None]
            prompts = [self.tokenizer.encode(text, add_special_tokens=not self.template.adds_special_tokens)]
        self._check_prompts(prompts, params)
        return PreparedRequest(request, prompts, texts, params)

    def _check_params(self, request: CompletionRequest | ChatCompletionRequest, params: SamplingParams) -> None:
        limits = self.limits
        if len(params.stop) > limits.max_stop_strings:
            raise _bad(
                f"stop holds {len(params.stop)} strings; this server accepts at most {limits.max_stop_strings} "
                f"(--{flag('max_stop_strings')})",
                "stop",
            )
        longest = max((len(s) for s in params.stop), default=0)
        if longest > limits.max_stop_string_chars:
            raise _bad(
                f"a stop string has {longest} characters; this server accepts at most "
                f"{limits.max_stop_string_chars} (--{flag('max_stop_string_chars')})",
                "stop",
            )
        wanted = max(params.logprobs or 0, params.prompt_logprobs or 0)
        if wanted > limits.max_logprobs:
            param = "top_logprobs" if isinstance(request, ChatCompletionRequest) else "logprobs"
            raise _bad(f"{param} must be at most {limits.max_logprobs} (--{flag('max_logprobs')}), got {wanted}", param)
        prompts = len(request.prompts()) if isinstance(request, CompletionRequest) else 1
        sequences = prompts * params.n
        if sequences > limits.max_sequences_per_request:
            raise _bad(
                f"the request asks for {sequences} sequences ({prompts} prompts x n={params.n}); this server "
                f"accepts at most {limits.max_sequences_per_request} (--{flag('max_sequences_per_request')})",
                "n",
            )
        if sequences > self.bounds.capacity:
            raise _bad(
                f"the request asks for {sequences} sequences ({prompts} prompts x n={params.n}), more than this "
                f"server can ever hold at once ({self.bounds.capacity}: --max-num-seqs plus --max-queue)",
                "n",
            )

    def _routing(self, request: CompletionRequest | ChatCompletionRequest) -> TokenRouting | None:
        """The server's routing budget (as started) with the request's `moe` field applied, checked against the
        model (Preprocessor.prepare merges it again against the live budget); None without the field: the
        request follows the server's setting, live switches included."""
        if request.moe is None:
            return None
        if not self.bounds.allow_request_routing:
            raise _bad("this server does not accept per-request routing (--allow-request-routing)", "moe")
        return merged_routing(self.bounds.routing, request.moe, self.bounds, "moe.")

    def _tokens(self, prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, str):
            return prompt
        if len(prompt) > self.max_prompt_chars:
            raise _bad(
                f"prompt is {len(prompt)} characters, more than any prompt that fits the maximum context length of "
                f"{self.bounds.max_model_len} tokens could have ({self.max_prompt_chars})",
                "prompt",
            )
        return self.tokenizer.encode(prompt)

    def _render(self, request: ChatCompletionRequest) -> str:
        try:
            return self.template.render(
                request.messages,
                request.add_generation_prompt,
                max_chars=self.max_prompt_chars,
                timeout_s=self.limits.chat_template_timeout,
            )
        except RenderTimeout as exc:
            raise _bad(f"{exc} (--{flag('chat_template_timeout')})", "messages") from exc
        except ChatTemplateError as exc:
            raise _bad(str(exc), "messages") from exc

    def _check_prompts(self, prompts: list[list[int]], params: SamplingParams) -> None:
        total = sum(len(p) for p in prompts)
        if total > self.limits.max_prompt_tokens_per_request:
            raise _bad(
                f"the request's prompts hold {total} tokens; this server accepts at most "
                f"{self.limits.max_prompt_tokens_per_request} per request (--{flag('max_prompt_tokens_per_request')})",
                "prompt",
            )
        for prompt in prompts:
            try:
                check_request(
                    prompt, params, self.bounds.vocab_size, self.bounds.max_model_len, self.limits.max_logprobs
                )
            except InvalidRequestError as exc:
                raise _bad(str(exc), exc.param) from exc


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad(f"malformed JSON body: {exc}") from exc
    except RecursionError as exc:
        raise _bad("malformed JSON body: nested too deeply") from exc
    if not isinstance(raw, dict):
        raise _bad(f"the body must be a JSON object, got {type(raw).__name__}")
    return raw


def _refuse_unencodable(value: Any, path: str) -> None:
    """Refuse text that is not valid Unicode (lone UTF-16 surrogates, which JSON escapes can carry), naming
    the field: no later stage could encode it, the error body included."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            _check_text(item, where)
        elif isinstance(item, dict):
            for key, inner in item.items():
                _check_text(key, f"{where}.{key}" if where else "a key")
                stack.append((inner, f"{where}.{key}" if where else key))
        elif isinstance(item, list):
            stack.extend(
                (inner, f"{where}[{i}]") for i, inner in enumerate(item) if isinstance(inner, (str, dict, list))
            )


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        param = where.split(".")[0].split("[")[0] or None
        raise _bad(
            f"{where}: holds a lone UTF-16 surrogate (\\u{ord(bad):04x}) at character {exc.start}, which is not valid "
            "Unicode text",
            param,
        ) from exc


def _precheck_prompt(prompt: Any, limits: RequestLimits) -> None:
    """Empty prompts and oversized batches, named before validation (which would only say that no form of
    prompt fits, and would first look at every element of a batch however long)."""
    if prompt in ("", []):
        raise _bad("prompt must not be empty", "prompt")
    if not isinstance(prompt, list) or isinstance(prompt[0], int):
        return
    if len(prompt) > limits.max_prompts_per_request:
        raise _bad(
            f"prompt holds {len(prompt)} prompts; this server accepts at most {limits.max_prompts_per_request} "
            f"per request (--{flag('max_prompts_per_request')})",
            "prompt",
        )
    empty = next((i for i, p in enumerate(prompt) if p in ("", [])), None)
    if empty is not None:
        raise _bad(f"prompt[{empty}] must not be empty", "prompt")


def _validate(model: type[BaseModel], raw: dict[str, Any]) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        raise _bad(*validation_message(list(errors))) from exc


def validation_message(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """Pydantic's errors as (message, param): the first problem, with the field it is in."""
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # Union members add their type names to the location; the field is the first part.
    param = loc[0] if loc else None
    if first.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {'.'.join(loc)}", param
    if param == "prompt" and len(loc) > 1 and not loc[1].isdigit():  # every member of the prompt union refused it
        return "prompt must be a string, a list of strings, token ids or lists of token ids", param
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    where = _field_path([part for part in loc if part not in TYPE_TAGS and not any(c in part for c in "[]()-")])
    return (f"{where}: {message}" if where else message), param


# Names pydantic adds to an error's location for the member of a union that refused the value.
TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "tuple"})


def _field_path(parts: list[str]) -> str:
    """messages, 0, content -> messages[0].content (as OpenAI names fields)."""
    path = ""
    for part in parts:
        path += f"[{part}]" if part.isdigit() else (f".{part}" if path else part)
    return path


_worker: _Worker | None = None
_start_error: str | None = None  # why this worker could not start (reported by the dry run, not raised)


def _start_worker(model_path: str, limits: RequestLimits, bounds: ModelBounds, parent_pid: int) -> None:
    """The pool's initializer. It must not raise (the pool would only say it broke), so a failure is kept."""
    global _worker, _start_error
    become_child(WORKER_NAME, parent_pid)
    try:
        _worker = _Worker(Path(model_path), limits, bounds)
    except Exception as exc:  # noqa: BLE001 - reported by the dry run with its message
        _start_error = str(exc)


def _prepare_in_worker(kind: str, body: bytes) -> PreparedRequest | RequestError:
    if _worker is None:
        return RequestError(500, f"the request worker could not start: {_start_error}", type="server_error")
    try:
        return _worker.prepare(kind, body)
    except Refused as refused:
        return refused.error


def _dry_run_in_worker() -> str | None:
    """The chat template's dry run, in a worker (where its time bound holds); the error message, or None."""
    if _worker is None:
        return _start_error
    try:
        _worker.template.dry_run(_worker.max_prompt_chars, _worker.limits.chat_template_timeout)
    except ChatTemplateError as exc:
        return str(exc)
    return None


# ----- in the HTTP process -----


class Preprocessor:
    """The HTTP process's handle on the worker pool.

    At most `max_pending` requests wait for or occupy a worker; past that, `prepare` refuses with 503. A worker
    that dies (out of memory, a crash in native code) fails the request it held with a 500 and the pool is
    started again.
    """

    def __init__(
        self, model_path: Path, limits: RequestLimits, bounds: ModelBounds, workers: int = 2, max_pending: int = 256
    ) -> None:
        if workers < 1:
            raise ValueError(f"--request-workers must be at least 1, got {workers}")
        self.model_path = model_path
        self.limits = limits
        self.bounds = bounds
        self.workers = workers
        self.max_pending = max_pending
        # The routing budget requests follow now (RoutingControl switches it); workers hold the one at start, so
        # a request's `moe` field is merged again against this one here.
        self.default_routing: Callable[[], TokenRouting] = lambda: bounds.routing
        self._pending = 0
        self._lock = threading.Lock()
        self._pool = self._start_pool()
        try:
            error = self._pool.submit(_dry_run_in_worker).result(timeout=START_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise
        if error is not None:
            self.shutdown()
            raise ChatTemplateError(error)

    def _start_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(str(self.model_path), self.limits, self.bounds, os.getpid()),
        )

    async def prepare(self, kind: str, body: bytes) -> PreparedRequest:
        """Parse, check and tokenize a "completion" or "chat" body; Refused if it cannot be served."""
        with self._lock:
            if self._pending >= self.max_pending:
                raise Refused(RequestError(503, f"{self._pending} requests are being prepared; retry shortly",
                                           code="queue_full", type="server_error"))  # fmt: skip
            self._pending += 1
            pool = self._pool
        try:
            result = await asyncio.wrap_future(pool.submit(_prepare_in_worker, kind, body))
        except BrokenProcessPool:
            self._restart(pool)
            raise Refused(RequestError(500, "a request worker died while preparing this request",
                                       type="server_error")) from None  # fmt: skip
        finally:
            with self._lock:
                self._pending -= 1
        if isinstance(result, RequestError):
            raise Refused(result)
        if result.body.moe is not None:
            result.params.routing = merged_routing(self.default_routing(), result.body.moe, self.bounds, "moe.")
        return result

    def _restart(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is not broken:
                return  # another request restarted it already
            logger.error("a request worker died; starting the pool again")
            self._pool = self._start_pool()
        broken.shutdown(wait=False, cancel_futures=True)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
