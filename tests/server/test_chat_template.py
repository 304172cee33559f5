"""Chat prompts: a model's own Jinja template (from chat_template.jinja or tokenizer_config.json), or the
documented plain default; a template that refuses the messages is a clear error."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.chat_template import ChatTemplate, ChatTemplateError
from server.protocol import ChatMessage
from tests.conftest import copy_checkpoint

TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MESSAGES = [
    ChatMessage(role="system", content="Be brief."),
    ChatMessage(role="user", content=[{"type": "text", "text": "Hi"}]),
]  # type: ignore[list-item]


def test_plain_default_without_a_template() -> None:
    template = ChatTemplate.from_model_dir(Path("/nonexistent"), {})
    assert template.render(MESSAGES) == "system: Be brief.\nuser: Hi\nassistant:"
    assert template.render(MESSAGES, add_generation_prompt=False) == "system: Be brief.\nuser: Hi\n"


def test_tokenizer_config_template_with_special_tokens() -> None:
    template = ChatTemplate.from_model_dir(Path("/nonexistent"), {"chat_template": TEMPLATE, "eos_token": "</s>"})
    assert template.render(MESSAGES) == "<|system|>Be brief.</s><|user|>Hi</s><|assistant|>"
    with pytest.raises(ChatTemplateError, match="no tools here"):
        template.render([ChatMessage(role="tool", content="x")])


def test_template_file_wins_and_broken_templates_fail_at_load(tmp_path: Path) -> None:
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert ChatTemplate.from_model_dir(tmp_path, {"chat_template": TEMPLATE}).render(MESSAGES) == "[Be brief.][Hi]"
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_server_renders_the_models_template(
    tmp_path: Path, tiny_model: Path, server_factory: Callable[..., Any]
) -> None:
    model = copy_checkpoint(tiny_model, tmp_path / "chatty")
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    with server_factory(model) as live, live.client() as http:
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
        reply = http.post("/v1/chat/completions", json=chat).json()
        prompt = "<|user|>Hi<|endoftext|><|assistant|>"
        completion = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0}).json()
        assert reply["choices"][0]["message"]["content"] == completion["choices"][0]["text"]
        assert reply["usage"]["prompt_tokens"] == completion["usage"]["prompt_tokens"]
        refused = http.post("/v1/chat/completions", json={"messages": [{"role": "tool", "content": "x"}]})
        assert refused.status_code == 400 and "no tools here" in refused.json()["error"]["message"]
        live.wait_idle()
