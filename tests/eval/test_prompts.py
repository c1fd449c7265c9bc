"""Prompt formatting: the checkpoint's chat template when its tokenizer_config.json has one, else plain text."""
import json

import pytest

from m1jax.eval.prompts import load_formatter, plain_prompt

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'][0]['text'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_plain_prompts(tmp_path):
    assert plain_prompt([{"role": "user", "content": "2+2?"}]) == "2+2?\n"
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert plain_prompt(chat) == "User: a\n\nAssistant: b\n\nUser: c\n\nAssistant:"
    assert load_formatter(tmp_path).kind == "plain"  # no tokenizer_config.json


def test_checkpoint_template_is_used(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    formatter = load_formatter(tmp_path)
    assert formatter.kind == "chat_template"
    assert formatter([{"role": "user", "content": "hi"}]) == "<user>hi</s><assistant>"
    assert load_formatter(tmp_path, use_template=False).kind == "plain"
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="--no-chat-template"):
        load_formatter(tmp_path)
