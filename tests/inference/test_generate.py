"""generate(): batches of ragged prompts, per-row stops, streaming, sampling seeds, usage and routing, bad input,
and inference-state checkpoints (save part-way through the prefill, resume, the same tokens).

Every call here shares one model, batch and prompt width, so the compiled steps are reused across tests.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from m1jax import M1ForCausalLM
from m1jax.config import RunPolicy
from m1jax.inference import (continue_generation, generate, load_inference_state, make_request, prefill,
                             save_inference_state, start)
from m1jax.inference.engine import Timings, prefill_remaining
from m1jax.inference.generate import model_with_threshold

NEW = 6
CHUNK = 8  # prompt width 30: chunks of 8, 8, 8, 6


@pytest.fixture(scope="module")
def prompts(tiny_config):
    rng = np.random.default_rng(5)
    return [rng.integers(0, tiny_config.vocab_size, n).tolist() for n in (5, 30, 1)]


def test_greedy_batch_stops_rows_and_counts_routing(tiny_config, tiny_params, prompts):
    model = M1ForCausalLM(tiny_config)
    free = generate(model, tiny_params, prompts, max_new_tokens=NEW, chunk_size=CHUNK, pad_id=3)
    assert free.tokens.shape == (3, 30 + NEW) and free.completion_lengths.tolist() == [NEW] * 3
    assert free.tokens[0, :25].tolist() == [3] * 25 and free.tokens[0, 25:30].tolist() == prompts[0]
    stop = free.completions[0][2]
    stopped = generate(model, tiny_params, prompts, max_new_tokens=NEW, chunk_size=CHUNK, pad_id=3, stop_ids=[stop])
    for row, full in zip(stopped.completions, free.completions):
        want = full[:full.index(stop) + 1] if stop in full else full
        assert row == want
    assert stopped.completion_lengths[0] <= 3
    # routing: every real token that went through the model (prompts, and each drawn token fed back) chose k experts
    fed = stopped.usage.prompt_tokens + stopped.usage.completion_tokens - len(prompts)
    np.testing.assert_array_equal(stopped.routing.tokens_per_expert.sum(-1), fed * tiny_config.experts_per_token)
    np.testing.assert_array_equal(stopped.routing.expert_calls, stopped.routing.tokens_per_expert)
    usage = stopped.usage
    assert usage.prompt_tokens == 36 and usage.completion_tokens == sum(stopped.completion_lengths)
    assert usage.prefill_seconds > 0 and usage.decode_seconds > 0 and usage.decode_tokens_per_second > 0
    assert set(usage.to_dict()) >= {"prefill_tokens_per_second", "decode_tokens_per_second", "compile_seconds"}


def test_streaming_sees_every_step_in_order(tiny_config, tiny_params, prompts):
    model = M1ForCausalLM(tiny_config)
    whole = generate(model, tiny_params, prompts, max_new_tokens=NEW, chunk_size=CHUNK, temperature=1.0, top_k=20,
                     seed=11)
    for interval in (1, 4):
        seen = []
        streamed = generate(model, tiny_params, prompts, max_new_tokens=NEW, chunk_size=CHUNK, temperature=1.0,
                            top_k=20, seed=11, stream=lambda step, tokens: seen.append((step, tokens.tolist())),
                            stream_interval=interval)
        np.testing.assert_array_equal(streamed.tokens, whole.tokens)
        assert [s for s, _ in seen] == list(range(NEW))
        np.testing.assert_array_equal(np.asarray([t for _, t in seen]).T, whole.tokens[:, 30:])
    other = generate(model, tiny_params, prompts, max_new_tokens=NEW, chunk_size=CHUNK, temperature=1.0, top_k=20,
                     seed=12)
    assert np.any(other.tokens != whole.tokens)


@pytest.mark.parametrize("eos_id", [7, None])  # None: no stop ids, a zero-size array in the state
def test_save_part_way_through_prefill_then_resume_gives_the_same_tokens(tiny_config, tiny_params, prompts,
                                                                         tmp_path, eos_id):
    model = M1ForCausalLM(tiny_config)
    settings = dict(max_new_tokens=NEW, temperature=1.0, top_k=20, seed=11, eos_id=eos_id, chunk_size=CHUNK)
    whole = generate(model, tiny_params, prompts, **settings)

    request = make_request(tiny_config, 30, **settings)
    state = prefill(model, tiny_params, start(tiny_config, prompts, request), request, max_chunks=2)
    assert prefill_remaining(state) == 14
    path = save_inference_state(tmp_path / "half", state, request, tiny_config)
    del state
    restored, restored_request = load_inference_state(path, tiny_config)
    assert restored_request == request and prefill_remaining(restored) == 14
    resumed = continue_generation(model, tiny_params, restored, restored_request, timings=Timings())
    np.testing.assert_array_equal(resumed.tokens, whole.tokens)
    np.testing.assert_array_equal(resumed.routing.tokens_per_expert, whole.routing.tokens_per_expert)

    with pytest.raises(ValueError, match="another model"):
        load_inference_state(path, tiny_config.replace(num_heads=8, num_kv_heads=4))
    with pytest.raises(ValueError, match="already exists"):
        save_inference_state(path, restored, request, tiny_config)
    # another run policy is the same model: the float32 cache comes back in the new compute dtype, and finishes
    bf16 = RunPolicy(compute_dtype="bfloat16")
    restored, _ = load_inference_state(path, tiny_config, policy=bf16)
    keys = [entry["key"] for entry in restored.cache.layers if "key" in entry]
    assert keys and all(key.dtype == jnp.bfloat16 for key in keys)
    finished = continue_generation(model.clone(policy=bf16), tiny_params, restored, request, timings=Timings())
    assert finished.tokens.shape == whole.tokens.shape


def test_expert_threshold_reaches_the_model(tiny_config):
    model = M1ForCausalLM(tiny_config)
    assert model_with_threshold(model, 0.0) is model
    assert model_with_threshold(model, 0.3).policy.expert_threshold == 0.3
    assert model_with_threshold(model, 0.3).config == tiny_config  # run-time policy, not another model
    assert model_with_threshold(model, None) is model


@pytest.mark.parametrize("prompt_ids,kwargs,match", [
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([], {}, "no prompt"),
    ([[1, 512]], {}, "outside"),
    ([[-1, 2]], {}, "outside"),
    ("hello", {}, "tokenize"),
    ([[1.5, 2]], {}, "non-integer"),
    ([[1, 2]], dict(max_new_tokens=65_535), "max_position_embeddings"),
    ([[1, 2]], dict(max_new_tokens=0), "max_new_tokens"),
    ([[1, 2]], dict(eos_id=512), "eos_id"),
    ([[1, 2]], dict(stop_ids=[9999]), "stop_ids"),
    ([[1, 2]], dict(temperature=-0.5), "temperature"),
    ([[1, 2]], dict(top_p=2.0), "top_p"),
    ([[1, 2]], dict(chunk_size=0), "chunk_size"),
])
def test_bad_input_is_refused_with_a_clear_error(tiny_config, tiny_params, prompt_ids, kwargs, match):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(M1ForCausalLM(tiny_config), tiny_params, prompt_ids, **kwargs)


def test_params_of_another_config_are_refused(tiny_config, tiny_params):
    wider = tiny_config.replace(expert_size=128)
    with pytest.raises(ValueError, match=r"moe.*w1.*expects"):
        generate(M1ForCausalLM(wider), tiny_params, [[1, 2]], max_new_tokens=2)
    fewer = jax.tree.map(lambda x: x, tiny_params)
    del fewer["lm_head"]
    with pytest.raises(ValueError, match="missing"):
        generate(M1ForCausalLM(tiny_config), fewer, [[1, 2]], max_new_tokens=2)
