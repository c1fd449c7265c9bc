"""Chat template rendering (against transformers' apply_chat_template in the reference venv) and tool-call parsing."""
import json
import os
import subprocess

import pytest

from m1jax.serve.chat_template import M1_CHAT_TEMPLATE, render_chat, template_of, to_template_messages
from m1jax.serve.tool_calls import ToolCallStream, parse_tool_calls

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REFERENCE_PYTHON = os.path.join(ROOT, ".refvenv", "bin", "python")
RELEASED = os.path.join(ROOT, "..", "shared", "minimax-m1", "tokenizer_config.json")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city, in °C",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "system", "content": " Really."},
     {"role": "user", "content": "Weather in Paris? ünïcode ✓"},
     {"role": "assistant", "content": "Let me check.", "tool_calls": [
         {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
         {"id": "c2", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1, \"b\": 2}"}}]},
     {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
     {"role": "tool", "tool_call_id": "c2", "content": "3"},
     {"role": "assistant", "content": [{"type": "text", "text": "It is 18 C."}]},
     {"role": "user", "content": [{"type": "text", "text": "Thanks"}, {"type": "text", "text": "!"}]}],
]

_REFERENCE = r"""
import json, sys
from transformers import PreTrainedTokenizerFast
from tokenizers import Tokenizer, models
cases = json.load(sys.stdin)
tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
out = [tok.apply_chat_template(c["messages"], tools=c["tools"], add_generation_prompt=c["gen"], tokenize=False,
                               chat_template=c["template"]) for c in cases]
print(json.dumps(out))
"""


def test_template_is_the_released_one():
    if not os.path.isfile(RELEASED):
        pytest.skip("the released tokenizer_config.json is not beside the repository")
    with open(RELEASED) as f:
        assert json.load(f)["chat_template"] == M1_CHAT_TEMPLATE


def test_rendering_equals_transformers_apply_chat_template():
    if not os.path.isfile(REFERENCE_PYTHON):
        pytest.skip(".refvenv (transformers) is absent")
    cases = [{"messages": to_template_messages(m), "tools": tools, "gen": gen, "template": M1_CHAT_TEMPLATE}
             for m in CONVERSATIONS for tools in (None, TOOLS) for gen in (True, False)]
    run = subprocess.run([REFERENCE_PYTHON, "-c", _REFERENCE], input=json.dumps(cases), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    reference = json.loads(run.stdout.strip().splitlines()[-1])
    ours = [render_chat(c["messages"], tools=c["tools"], add_generation_prompt=c["gen"]) for c in cases]
    assert ours == reference
    assert "tool name: get_weather\ntool result: 18 C" in ours[-1]  # the tool turn is named from its call


def test_checkpoint_template_wins(tmp_path):
    assert template_of(None) == template_of(tmp_path) == M1_CHAT_TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages | length }}"}))
    assert template_of(tmp_path) == "{{ messages | length }}"


@pytest.mark.parametrize("messages, field", [([], "messages"), ([{"role": "robot", "content": "x"}], "role"),
                                             ([{"role": "user", "content": 3}], "content"),
                                             ([{"role": "tool", "content": "x"}], "tool_call_id")])
def test_bad_messages_name_the_field(messages, field):
    with pytest.raises(ValueError, match=field):
        to_template_messages(messages)


CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TEXTS = [
    ("Sure.\n<tool_calls>\n" + CALL + "\n{'name': 'add', 'arguments': {'a': 1}}\n</tool_calls>", 2, "Sure."),
    ("<tool_calls>\n" + CALL + "\n</tool_calls>", 1, None),
    ("<tool_calls>\n{\"name\": \"get_weather\", \"arguments\": {\n</tool_calls> rest", 0, None),  # stays content
    ("no calls at all, only a < and <tool_c", 0, None),
    ("<tool_calls>\n" + CALL + "\n", 0, None),  # never closed: content
]


@pytest.mark.parametrize("text, count, content", TEXTS)
def test_parse_and_stream_agree(text, count, content, rng):
    got_content, calls = parse_tool_calls(text)
    assert len(calls) == count
    if count:
        assert got_content == content
        assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    else:
        assert got_content == text  # nothing dropped
    for _ in range(5):  # random splits into deltas give the same content and calls
        cuts = sorted(set(rng.integers(0, len(text) + 1, int(rng.integers(1, 12))).tolist()))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        stream = ToolCallStream()
        events = [e for p in pieces for e in stream.feed(p)] + stream.close()
        streamed = "".join(v for k, v in events if k == "content")
        names = [v["function"]["name"] for k, v in events if k == "tool_call"]
        assert names == [c["function"]["name"] for c in calls]
        assert streamed.strip() == (got_content or "").strip()
