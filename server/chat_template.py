"""Chat messages to a prompt: the model's own Jinja chat template when its tokenizer files carry one, a plain
documented format otherwise.

Templates come from `chat_template.jinja` in the model directory or `chat_template` in tokenizer_config.json
(as transformers saves them) and run in Jinja's sandbox with the variables transformers provides.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.protocol import ChatMessage


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (the template refused them, or it is broken)."""


def plain_prompt(messages: list[ChatMessage], add_generation_prompt: bool) -> str:
    """The default for models without a template: one "role: content" line per message, then "assistant:"."""
    lines = [f"{m.role}: {m.text()}\n" for m in messages]
    return "".join(lines) + ("assistant:" if add_generation_prompt else "")


class ChatTemplate:
    """Renders messages with a model's template (or the plain default when `source` is None).

    A template's prompt already holds the special tokens it wants, so it is encoded without adding any.
    """

    def __init__(self, source: str | None, special_tokens: dict[str, str] | None = None) -> None:
        self.source = source
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
                raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from exc

    @classmethod
    def from_model_dir(cls, path: Path, tokenizer_config: dict[str, Any]) -> ChatTemplate:
        file = path / "chat_template.jinja"
        source = file.read_text() if file.is_file() else tokenizer_config.get("chat_template")
        if isinstance(source, list):  # named templates: use the default one
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        special = {}
        for key in ("bos_token", "eos_token"):
            value = tokenizer_config.get(key)
            text = value.get("content") if isinstance(value, dict) else value
            if isinstance(text, str):
                special[key] = text
        return cls(source if isinstance(source, str) else None, special)

    @property
    def adds_special_tokens(self) -> bool:
        return self._template is not None

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            return plain_prompt(messages, add_generation_prompt)
        plain = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in messages]
        try:
            return self._template.render(
                messages=plain, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template rejected the messages: {exc}") from exc


def _raise(message: str) -> None:
    raise TemplateError(message)
