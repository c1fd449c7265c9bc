"""Chat prompts: M1's released chat template rendered through jinja2 as transformers' `apply_chat_template` does.

    text = render_chat(messages, tools=None, add_generation_prompt=True, template=None)

The template (`chat_template` of MiniMax-M1's tokenizer_config.json, kept verbatim below) expects every message's
content as a list of parts ({"type": "text", "text": ...}; a tool result part also carries the tool's "name"). OpenAI
messages are brought into that shape by `to_template_messages`:
  - a string content becomes one text part; a list of OpenAI parts keeps its text parts (others are an error);
  - an assistant turn's `tool_calls` become its text as the block the model is asked to write
    (`<tool_calls>` + one JSON object {"name", "arguments"} a line + `</tool_calls>`), after its content;
  - a `tool` turn's part is named after the function of the call it answers (`tool_call_id`), else its `name`.
The environment is transformers': a sandbox, trim_blocks and lstrip_blocks, the loopcontrols extension, `tojson`
without ASCII escaping, and `raise_exception`. A checkpoint's own template (its tokenizer_config.json) wins.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Sequence

M1_CHAT_TEMPLATE = (  # MiniMax-M1 tokenizer_config.json "chat_template", verbatim (split for line length)
    "{{ '<begin_of_document>' -}}{% set ns = namespace(system_prompt='') -%}{% for message in message"
    "s -%}{% if message['role'] == 'system' -%}{% set ns.system_prompt = ns.system_prompt + message['"
    "content'][0]['text'] -%}{% endif -%}{%- endfor -%}{% if ns.system_prompt != '' -%}{{ '<beginning"
    "_of_sentence>system ai_setting=assistant\n' + ns.system_prompt + '<end_of_sentence>\n' -}}{%- endi"
    "f -%}{% if tools -%}{{ '<beginning_of_sentence>system tool_setting=tools\nYou are provided with t"
    "hese tools:\n<tools>\n' -}}{% for tool in tools -%}{{ tool | tojson ~ '\n' -}}{%- endfor -%}{{ '</t"
    'ools>\n\nIf you need to call tools, please respond with <tool_calls></tool_calls> XML tags, and pr'
    "ovide tool-name and json-object of arguments, following the format below:\n<tool_calls>\n{''name''"
    ": <tool-name-1>, ''arguments'': <args-json-object-1>}\n...\n</tool_calls><end_of_sentence>\n' -}}{%"
    "- endif -%}{% for message in messages -%}{% if message['role'] == 'user' -%}{{ '<beginning_of_se"
    "ntence>user name=user\n' + message['content'][0]['text'] + '<end_of_sentence>\n' -}}{% elif messag"
    "e['role'] == 'assistant' -%}{{ '<beginning_of_sentence>ai name=assistant\n' -}}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'text') -%}{{ content['text'] -}}{%- endfor -"
    "%}{{ '<end_of_sentence>\n' -}}{% elif message['role'] == 'tool' -%}{{ '<beginning_of_sentence>too"
    "l name=tools\n' }} {%- for content in message['content'] -%}{{- 'tool name: ' + content['name'] +"
    " '\n' + 'tool result: ' + content['text'] + '\n\n' -}} {%- endfor -%}{{- '<end_of_sentence>\n' -}}{%"
    " endif -%}{%- endfor -%}{% if add_generation_prompt -%}{{ '<beginning_of_sentence>ai name=assist"
    "ant\n' -}}{%- endif -%}"
)


def template_of(checkpoint: str | os.PathLike | None) -> str:
    """The checkpoint's chat template (tokenizer_config.json's chat_template) if it has one, else M1's."""
    if checkpoint is not None:
        path = os.path.join(os.fspath(checkpoint), "tokenizer_config.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                template = json.load(f).get("chat_template")
            if isinstance(template, list):  # several named templates: the default one
                template = next((t["template"] for t in template if t.get("name") == "default"), None)
            if isinstance(template, str) and template:
                return template
    return M1_CHAT_TEMPLATE


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str):
    from jinja2.exceptions import TemplateError
    raise TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def render_chat(messages: Sequence[dict], *, tools: Sequence[dict] | None = None, add_generation_prompt: bool = True,
                template: str | None = None, **extra: Any) -> str:
    """Render already template-shaped messages (see to_template_messages) with the template (default M1's)."""
    return _compiled(template or M1_CHAT_TEMPLATE).render(
        messages=list(messages), tools=list(tools) if tools else None, add_generation_prompt=add_generation_prompt,
        **extra)


def tool_call_block(calls: Sequence[dict]) -> str:
    """OpenAI tool_calls -> the `<tool_calls>` block M1 writes: one {"name", "arguments"} JSON object a line."""
    lines = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError("messages: each tool_calls entry needs function.name (a string)")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise ValueError(f"messages: tool call {function['name']!r} has arguments that are not JSON: "
                                 f"{arguments[:80]!r}") from None
        lines.append(json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False))
    return "<tool_calls>\n" + "\n".join(lines) + "\n</tool_calls>"


def _text_of(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"{where}.content: only text parts ({{'type': 'text', 'text': ...}}) are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(f"{where}.content must be a string or a list of text parts, got {type(content).__name__}")


def to_template_messages(messages: Any) -> list[dict]:
    """OpenAI chat messages -> the shape M1's template reads (see the module docstring). ValueError names the field."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    call_names: dict[str, str] = {}
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object with role and content")
        role = message.get("role")
        if role not in ("system", "user", "assistant", "tool", "developer"):
            raise ValueError(f"{where}.role must be system, user, assistant or tool, got {role!r}")
        text = _text_of(message.get("content"), where)
        if role == "assistant" and message.get("tool_calls"):
            if not isinstance(message["tool_calls"], list):
                raise ValueError(f"{where}.tool_calls must be a list")
            for call in message["tool_calls"]:
                if isinstance(call, dict) and isinstance(call.get("function"), dict):
                    call_names[str(call.get("id"))] = call["function"].get("name", "")
            text = text + tool_call_block(message["tool_calls"])
        if role == "tool":
            name = call_names.get(str(message.get("tool_call_id")), message.get("name"))
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}: a tool message needs a tool_call_id of an earlier tool call, or a name")
            out.append({"role": "tool", "content": [{"type": "text", "name": name, "text": text}]})
        else:
            out.append({"role": "system" if role == "developer" else role, "content": [{"type": "text", "text": text}]})
    return out
