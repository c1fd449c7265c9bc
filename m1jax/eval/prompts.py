"""Messages -> prompt text: the checkpoint's chat template where one is available, else a plain transcript.

    format_prompt = load_formatter("MiniMax-M1-80k/")   # a callable: list of {"role", "content"} -> str
    format_prompt.kind                                   # "chat_template" or "plain"

Plain (no template): a single user message is its content followed by a newline; a conversation is written as
"User: ...\\n\\nAssistant: ...\\n\\n" turns ending in "Assistant:". A checkpoint whose tokenizer_config.json holds a
`chat_template` gets it instead, rendered by the server's renderer (m1jax.serve.chat_template: jinja2 as
transformers renders it) with the generation prompt appended. results.json records which ("prompt_format").
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

Messages = Sequence[dict[str, Any]]


def plain_prompt(messages: Messages) -> str:
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"] + "\n"
    turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages)
    return turns + "Assistant:"


class Formatter:
    def __init__(self, render: Callable[[Messages], str], kind: str):
        self.render, self.kind = render, kind

    def __call__(self, messages: Messages) -> str:
        return self.render(messages)


def checkpoint_has_template(checkpoint: str) -> bool:
    """Whether the checkpoint's tokenizer_config.json names a chat_template."""
    path = os.path.join(checkpoint, "tokenizer_config.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        try:
            return bool(json.load(f).get("chat_template"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); fix it or pass --no-chat-template") from None


def _serve_renderer(checkpoint: str) -> Callable[[Messages], str] | None:
    """The serving package's renderer with this checkpoint's template, or None where either is missing."""
    if not checkpoint_has_template(checkpoint):
        return None
    try:
        from m1jax.serve.chat_template import render_chat, template_of, to_template_messages
    except ImportError:
        return None
    template = template_of(checkpoint)
    return lambda messages: render_chat(to_template_messages(list(messages)), add_generation_prompt=True,
                                        template=template)


def load_formatter(checkpoint: str | os.PathLike | None, *, use_template: bool = True) -> Formatter:
    """The checkpoint's chat template (when use_template and the renderer finds one), else plain prompts."""
    if use_template and checkpoint is not None:
        render = _serve_renderer(os.fspath(checkpoint))
        if render is not None:
            return Formatter(render, "chat_template")
    return Formatter(plain_prompt, "plain")
