"""Greedy generation is token-identical to transformers' generate on the random parity checkpoints.

One batch per case holds the parity fixture's prompts (tests/fixtures/parity/<case>/expected.npz: greedy_ids, no
padding, no eos) and the generation fixture's prompts of different lengths (tests/fixtures/generation/<case>.npz:
each row generated alone by transformers, stopping at eos_id). Our batch is left-padded, stops rows at eos_id
separately and is prefilled in several chunks where the prompt allows it.
"""
import os

import numpy as np
import pytest

from m1jax import M1ForCausalLM, load_pretrained
from m1jax.inference import generate

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
CHUNK_SIZE = {"m1_schedule": 130, "mqa_odd": 20, "full_rotary": 7, "tiny_block": 13}  # 2x130, 2x20, 3x7, 1x13


def through_first(tokens: np.ndarray, stop: int) -> list[int]:
    tokens = tokens.tolist()
    return tokens[:tokens.index(stop) + 1] if stop in tokens else tokens


@pytest.mark.parametrize("case", sorted(CHUNK_SIZE))
def test_greedy_tokens_match_transformers(case):
    config, params = load_pretrained(os.path.join(FIXTURES, "parity", case))
    parity = np.load(os.path.join(FIXTURES, "parity", case, "expected.npz"))
    gen = np.load(os.path.join(FIXTURES, "generation", f"{case}.npz"))
    eos, pad, new_tokens = int(gen["eos_id"]), int(gen["pad_id"]), int(gen["max_new_tokens"])
    prompt_len = parity["prompt_ids"].shape[1]
    assert parity["greedy_ids"].shape[1] - prompt_len == new_tokens

    prompts = [row.tolist() for row in parity["prompt_ids"]]
    expected = [through_first(row[prompt_len:], eos) for row in parity["greedy_ids"]]
    for row, n, new, m in zip(gen["prompt_ids"], gen["prompt_lengths"], gen["new_ids"], gen["new_lengths"]):
        prompts.append(row[len(row) - n:].tolist())
        expected.append(new[:m].tolist())
    assert any(len(e) < new_tokens for e in expected) and any(len(e) == new_tokens for e in expected)

    out = generate(M1ForCausalLM(config), params, prompts, max_new_tokens=new_tokens, eos_id=eos, pad_id=pad,
                   chunk_size=CHUNK_SIZE[case])
    assert out.completions == expected
    width = max(map(len, prompts))
    for b, (prompt, completion) in enumerate(zip(prompts, expected)):  # transformers' layout: pads, prompt, new
        row = [pad] * (width - len(prompt)) + prompt + completion
        np.testing.assert_array_equal(out.tokens[b], row + [pad] * (out.tokens.shape[1] - len(row)))
    assert out.tokens.shape[1] == width + new_tokens
    assert out.usage.completion_tokens == sum(map(len, expected))
    assert out.usage.prompt_tokens == sum(map(len, prompts))
