"""The seed's Python snippet, as written, against a local directory (m1jax/auto.py)."""
import numpy as np

import m1jax


def test_seed_snippet_runs_as_written(checkpoint):
    from m1jax import MiniMaxM1ForCausalLM, MiniMaxM1Tokenizer
    tokenizer = MiniMaxM1Tokenizer.from_pretrained(checkpoint)
    model = MiniMaxM1ForCausalLM.from_pretrained(checkpoint)
    text = "The weather in Paris"
    inputs = tokenizer(text, return_tensors="np")
    outputs = model.generate(**inputs, max_new_tokens=7)  # the shapes of test_server's generate: compiled once
    prompt = tokenizer.encode(text)
    reference = m1jax.generate(model.module, model.params, [prompt], max_new_tokens=7,
                               eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    np.testing.assert_array_equal(outputs, reference.tokens)
    assert tokenizer.decode(outputs[0]).startswith(text)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    rendered = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    assert ids == tokenizer.encode(rendered) and rendered.endswith("<beginning_of_sentence>ai name=assistant\n")
    batch = tokenizer(["Hello", "The weather in Paris"], return_tensors="np")
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["attention_mask"][0, 0] == 0
