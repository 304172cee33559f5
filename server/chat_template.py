"""Chat messages to a prompt: the model's own Jinja chat template when its tokenizer files carry one, a plain
documented format otherwise.

Templates come from `chat_template.jinja` in the model directory or `chat_template` in tokenizer_config.json
(as transformers saves them) and run in Jinja's sandbox with the variables transformers provides. A template
is compiled and dry-run on a sample conversation before the server starts, so a broken one refuses to start
naming its file instead of failing requests; rendering stops at a character limit, and the request workers
that render it bound its time (server/preprocess.py).
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.protocol import ChatMessage

# What the dry run renders: the alternation every chat template must accept.
SAMPLE_CONVERSATION = [
    ChatMessage(role="user", content="Hello"),
    ChatMessage(role="assistant", content="Hi! How can I help?"),
    ChatMessage(role="user", content="Tell me a story."),
]


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (the template refused them, or it is broken)."""


class RenderedTooLong(ChatTemplateError):
    """The rendered prompt passed the character limit (it could not fit the context anyway)."""


class RenderTimeout(ChatTemplateError):
    """Rendering ran past its time bound."""


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise RenderTimeout in the block after `seconds` (a SIGALRM timer: the main thread of a process that
    owns its alarm, as a request worker does; elsewhere, or with None, no bound)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(_signum: int, _frame: Any) -> None:
        raise RenderTimeout(f"rendering the chat template took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def plain_prompt(messages: list[ChatMessage], add_generation_prompt: bool) -> str:
    """The default for models without a template: one "role: content" line per message, then "assistant:"."""
    lines = [f"{m.role}: {m.text()}\n" for m in messages]
    return "".join(lines) + ("assistant:" if add_generation_prompt else "")


class ChatTemplate:
    """Renders messages with a model's template (or the plain default when `source` is None).

    A template's prompt already holds the special tokens it wants, so it is encoded without adding any.
    `origin` names where the template came from, for errors.
    """

    def __init__(self, source: str | None, special_tokens: dict[str, str] | None = None, origin: str = "") -> None:
        self.source = source
        self.origin = origin or "the chat template"
        self.special_tokens = special_tokens or {}
        self._template = None
        if source is not None:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.globals["raise_exception"] = _raise
            env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
            try:
                self._template = env.from_string(source)
            except TemplateError as exc:
                raise ChatTemplateError(f"{self.origin}: the chat template does not compile: {exc}") from exc

    @classmethod
    def from_model_dir(cls, path: Path, tokenizer_config: dict[str, Any]) -> ChatTemplate:
        file = path / "chat_template.jinja"
        origin = str(file)
        if file.is_file():
            source: Any = file.read_text()
        else:
            source, origin = tokenizer_config.get("chat_template"), str(path / "tokenizer_config.json")
        if isinstance(source, list):  # named templates: use the default one
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        special = {}
        for key in ("bos_token", "eos_token"):
            value = tokenizer_config.get(key)
            text = value.get("content") if isinstance(value, dict) else value
            if isinstance(text, str):
                special[key] = text
        return cls(source if isinstance(source, str) else None, special, origin)

    @property
    def adds_special_tokens(self) -> bool:
        return self._template is not None

    def render(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool = True,
        max_chars: int | None = None,
        timeout_s: float | None = None,
    ) -> str:
        """The prompt. RenderedTooLong past max_chars (rendering stops there), RenderTimeout past timeout_s
        (see time_limit), ChatTemplateError if the template refuses the messages or fails on them."""
        if self._template is None:
            text = plain_prompt(messages, add_generation_prompt)
            if max_chars is not None and len(text) > max_chars:
                raise RenderedTooLong(f"the chat prompt is {len(text)} characters, more than the {max_chars} allowed")
            return text
        plain = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in messages]
        pieces: list[str] = []
        size = 0
        try:
            with time_limit(timeout_s):
                for piece in self._template.generate(
                    messages=plain, add_generation_prompt=add_generation_prompt, **self.special_tokens
                ):
                    size += len(piece)
                    if max_chars is not None and size > max_chars:
                        raise RenderedTooLong(f"the rendered chat prompt passed the limit of {max_chars} characters")
                    pieces.append(piece)
        except ChatTemplateError:
            raise
        except TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template rejected the messages: {exc}") from exc
        except Exception as exc:
            raise ChatTemplateError(f"the model's chat template failed on the messages: {exc!r}") from exc
        return "".join(pieces)

    def dry_run(self, max_chars: int | None = None, timeout_s: float | None = None) -> None:
        """Render a sample conversation; ChatTemplateError naming the template's file if it cannot."""
        try:
            self.render(SAMPLE_CONVERSATION, True, max_chars, timeout_s)
        except ChatTemplateError as exc:
            raise ChatTemplateError(f"{self.origin}: the chat template fails on a sample conversation: {exc}") from exc


def _raise(message: str) -> None:
    raise TemplateError(message)
