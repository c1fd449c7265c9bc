"""Inputs checked at the public edges: token ids through model.apply and generate(), and generate()'s settings,
fuzzed with hypothesis. Every bad input is a ValueError naming the argument, never NaN logits, a deep traceback
or a silently different request."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.experimental import checkify

import m1jax
from m1jax.inference.generate import check_prompts, generate, make_request

CONFIG = m1jax.M1Config(vocab_size=32, hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8, num_experts=2,
                        experts_per_token=1, expert_size=8, layer_types=("lightning", "softmax"), rotary_dim=4,
                        max_position_embeddings=64)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def params():
    return m1jax.init_params(CONFIG, jax.random.key(0))


@pytest.mark.parametrize("bad", [CONFIG.vocab_size, -1, 10 ** 6])
def test_model_apply_rejects_out_of_range_ids(params, bad):
    model = m1jax.M1ForCausalLM(CONFIG)
    ids = jnp.asarray([[1, 2, 3], [4, bad, 5]], jnp.int32)
    with pytest.raises(ValueError, match=rf"input_ids\[1, 1\] = {bad} is outside \[0, vocab_size=32\)"):
        model.apply({"params": params}, ids)


def test_model_apply_rejects_float_and_wrong_rank_ids(params):
    model = m1jax.M1ForCausalLM(CONFIG)
    with pytest.raises(ValueError, match="integer token ids"):
        model.apply({"params": params}, jnp.ones((1, 3), jnp.float32))
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        model.apply({"params": params}, jnp.ones((3,), jnp.int32))


def test_traced_bad_ids_are_nan_never_plausible_and_checkify_reports_them(params):
    """Under jit the documented policy: a bad id (negative too, which jnp.take would wrap) gives NaN logits at its
    position; checkify.index_checks turns it into an error."""
    model = m1jax.M1ForCausalLM(CONFIG)
    apply = jax.jit(lambda p, ids: model.apply({"params": p}, ids).logits)
    good = np.asarray(apply(params, jnp.asarray([[1, 2, 3]], jnp.int32)))
    assert np.isfinite(good).all()
    checked = checkify.checkify(apply, errors=checkify.index_checks)
    for bad in (-1, CONFIG.vocab_size):
        ids = jnp.asarray([[1, bad, 3]], jnp.int32)
        assert np.isnan(np.asarray(apply(params, ids))[0, 1]).all()
        error, _ = checked(params, ids)
        assert error.get() is not None and "out of bounds" in error.get()
    error, _ = checked(params, jnp.asarray([[1, 2, 3]], jnp.int32))
    assert error.get() is None


def test_generate_rejects_bad_ids_before_running(params):
    model = m1jax.M1ForCausalLM(CONFIG)
    for prompt, match in (([1, -1], "outside"), ([[1], [32]], "outside"), ([[1], []], "empty"),
                          ("hello", "tokenize"), ([[1.5]], "non-integer"), ([True], "non-integer")):
        with pytest.raises(ValueError, match=match):
            generate(model, params, prompt, max_new_tokens=2)


ANY = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True),
                st.text(max_size=3), st.lists(st.integers(-3, 40), max_size=3))


@FUZZ
@given(prompt=st.one_of(ANY, st.lists(st.one_of(st.integers(-5, 40), st.booleans(), st.floats(), st.text(max_size=1),
                                                 st.lists(st.integers(-5, 40), max_size=4)), max_size=4)))
def test_fuzz_prompts(prompt):
    try:
        rows = check_prompts(prompt, CONFIG.vocab_size)
    except ValueError as err:
        assert "prompt" in str(err)
        return
    # accepted: exactly the given ids, every one in range, nothing dropped or converted
    given_rows = [prompt] if all(isinstance(i, int) for i in prompt) else prompt
    assert rows == [list(r) for r in given_rows]
    assert all(r and all(type(i) is int and 0 <= i < CONFIG.vocab_size for i in r) for r in rows)


SETTING = {"max_new_tokens": st.one_of(ANY, st.integers(1, 40)), "temperature": st.one_of(ANY, st.floats(0, 3)),
           "top_k": st.one_of(ANY, st.integers(1, 50)), "top_p": st.one_of(ANY, st.floats(0, 1)),
           "seed": ANY, "eos_id": st.one_of(ANY, st.integers(0, 31)), "stop_ids": ANY,
           "pad_id": st.one_of(ANY, st.integers(0, 31)), "chunk_size": st.one_of(ANY, st.integers(1, 64))}


@FUZZ
@given(st.fixed_dictionaries({}, optional=SETTING), st.integers(1, 70))
def test_fuzz_generate_settings(kwargs, longest):
    kwargs.setdefault("max_new_tokens", 4)
    try:
        request = make_request(CONFIG, longest, **kwargs)
    except ValueError as err:
        named = [name for name in (*SETTING, "stop_ids entry") if name in str(err)]
        assert named or "max_position_embeddings" in str(err), str(err)
        return
    # accepted: the request says exactly what was asked
    assert request.max_new_tokens == kwargs["max_new_tokens"] >= 1
    assert longest + request.max_new_tokens <= CONFIG.max_position_embeddings
    assert math.isfinite(request.sampling.temperature) and request.sampling.temperature >= 0
    assert request.sampling.temperature == kwargs.get("temperature", 0.0)
    assert request.sampling.top_k == kwargs.get("top_k") and request.sampling.top_p == kwargs.get("top_p")
    assert request.seed == kwargs.get("seed", 0) and request.pad_id == kwargs.get("pad_id", 0)
    stops = tuple(kwargs.get("stop_ids", ())) + ((kwargs["eos_id"],) if kwargs.get("eos_id") is not None else ())
    assert request.stop_ids == stops and all(0 <= i < CONFIG.vocab_size for i in stops)
    jax.random.key(request.seed)  # any accepted seed makes a key
