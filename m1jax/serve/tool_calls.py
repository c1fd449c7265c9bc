"""Tool calls: M1's `<tool_calls>` blocks -> OpenAI `tool_calls`, whole or streamed.

M1's template asks the model to answer a tool request with

    <tool_calls>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    ...one JSON object a line...
    </tool_calls>

`parse_tool_calls(text)` returns the text without the blocks and the calls. Every line of a block must parse
(JSON, or a Python literal such as the template's own example with single quotes) into {"name": str,
"arguments": object or JSON string}; a block with any line that does not stays in the content as written, so nothing
the model wrote is dropped. `ToolCallStream` does the same on streamed text: content passes through at once except
a tail that could begin a block; a block is held until it closes, then sent as tool-call deltas or, if it does
not parse (or never closes), as content.
"""
from __future__ import annotations

import ast
import json
import re
import uuid
from typing import Any

OPEN, CLOSE = "<tool_calls>", "</tool_calls>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.S)


def _parse_line(line: str) -> dict | None:
    for loads in (json.loads, ast.literal_eval):
        try:
            value = loads(line)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, dict) and isinstance(value.get("name"), str) and value["name"]:
            arguments = value.get("arguments", {})
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    return None
            if not isinstance(arguments, dict):
                return None
            try:
                encoded = json.dumps(arguments, ensure_ascii=False)
            except (TypeError, ValueError):
                return None
            return {"name": value["name"], "arguments": encoded}
        return None
    return None


def parse_block(inner: str) -> list[dict] | None:
    """The text between <tool_calls> and </tool_calls> -> [{"name", "arguments" (JSON string)}], or None."""
    lines = [line.strip() for line in inner.strip().splitlines() if line.strip()]
    if not lines:
        return None
    calls = [_parse_line(line) for line in lines]
    return None if any(c is None for c in calls) else calls


def openai_call(call: dict, index: int) -> dict:
    return {"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": call["arguments"]}}


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """text -> (content without the parsed blocks (None when nothing else is left), OpenAI tool_calls)."""
    calls: list[dict] = []
    pieces, last = [], 0
    for match in _BLOCK.finditer(text):
        parsed = parse_block(match.group(1))
        if parsed is None:
            continue  # stays in the content
        pieces.append(text[last:match.start()])
        last = match.end()
        calls += [openai_call(c, len(calls) + i) for i, c in enumerate(parsed)]
    pieces.append(text[last:])
    content = "".join(pieces)
    if calls:
        content = content.strip()
        for call in calls:
            call.pop("index")
    return (content if content or not calls else None), calls


class ToolCallStream:
    """feed(delta) / close() -> a list of ("content", text) and ("tool_call", OpenAI tool-call dict with index)."""

    def __init__(self):
        self.buffer = ""
        self.in_block = False
        self.count = 0

    def feed(self, delta: str) -> list[tuple[str, Any]]:
        self.buffer += delta
        out: list[tuple[str, Any]] = []
        while True:
            if not self.in_block:
                at = self.buffer.find(OPEN)
                if at >= 0:
                    if at:
                        out.append(("content", self.buffer[:at]))
                    self.buffer = self.buffer[at:]
                    self.in_block = True
                    continue
                keep = next((n for n in range(min(len(OPEN) - 1, len(self.buffer)), 0, -1)
                             if self.buffer.endswith(OPEN[:n])), 0)
                ready = self.buffer[:len(self.buffer) - keep]
                if ready:
                    out.append(("content", ready))
                self.buffer = self.buffer[len(ready):]
                return out
            end = self.buffer.find(CLOSE)
            if end < 0:
                return out
            block, self.buffer = self.buffer[:end + len(CLOSE)], self.buffer[end + len(CLOSE):]
            self.in_block = False
            parsed = parse_block(block[len(OPEN):-len(CLOSE)])
            if parsed is None:
                out.append(("content", block))
            else:
                for call in parsed:
                    out.append(("tool_call", openai_call(call, self.count)))
                    self.count += 1

    def close(self) -> list[tuple[str, Any]]:
        """The end of the text: whatever is held (an unclosed block, a partial tag) is content."""
        rest, self.buffer, self.in_block = self.buffer, "", False
        return [("content", rest)] if rest else []
