"""Continuous batching against its slow twins: m1jax.generate (one request at a time, and a static batch), and
m1jax.inference.sampling (per-row sampling)."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import m1jax
from m1jax.checkpoint.state import load_any
from m1jax.inference.sampling import SamplingParams, filtered_logits
from m1jax.serve import steps
from m1jax.serve.batcher import BUCKET, Batcher, Job, QueueFull, chunk_lengths



@pytest.fixture(scope="module")
def model_and_params(checkpoint):
    """The live server's checkpoint (the same config: the compiled steps are shared with test_server)."""
    config, params = load_any(checkpoint)
    return m1jax.M1ForCausalLM(config), params


def test_chunk_lengths():
    assert chunk_lengths(48, 32) == [32, 16]
    assert chunk_lengths(112, 64) == [64, 32, 16]
    for length in range(BUCKET, 400, BUCKET):
        parts = chunk_lengths(length, 64)
        assert sum(parts) == length and all(p in (16, 32, 64) for p in parts)


def test_filter_rows_matches_sampling(rng):
    """Each row's kept set and scaled logits equal sampling.filtered_logits with that row's settings."""
    batch, vocab = 4, 37
    logits = jnp.asarray(rng.standard_normal((batch, vocab)) * 3, jnp.float32)
    logits = logits.at[0, :5].set(logits[0, 5])  # ties with the k-th value
    settings = [(0.7, 3, None), (1.0, None, 0.5), (1.3, 10, 0.9), (1.0, vocab + 4, 0.3)]
    temperature = jnp.asarray([s[0] for s in settings], jnp.float32)
    top_k = jnp.asarray([vocab if s[1] is None else s[1] for s in settings], jnp.int32)
    top_p = jnp.asarray([1.0 if s[2] is None else s[2] for s in settings], jnp.float32)
    got = np.asarray(steps.filter_rows(logits, temperature, top_k, top_p))
    for b, (t, k, p) in enumerate(settings):
        want = np.asarray(filtered_logits(logits[b:b + 1], SamplingParams(t, k, p)))[0]
        np.testing.assert_array_equal(np.isinf(got[b]), np.isinf(want), err_msg=f"row {b} {settings[b]}")
        kept = ~np.isinf(want)
        np.testing.assert_allclose(got[b][kept], want[kept], rtol=1e-6)


def _batcher(model, params, **kw):
    """The live server's shapes (tests/serve/conftest.py), so both share compiled steps."""
    return Batcher(model, params, lambda ids: " ".join(map(str, ids)), **{"max_batch": 8, "max_context": 1024,
                                                                          "chunk_size": 32, **kw})


def test_greedy_equals_generate_alone_and_batched(model_and_params, rng):
    """More requests than slots, awkward prompt lengths, insertions mid-decode: each greedy completion equals the
    same request alone in the batcher and its row of one static m1jax.generate batch, and per-request routing
    counts sum to the static batch's (test_server compares one request with m1jax.generate on its prompt alone)."""
    model, params = model_and_params
    lengths = [1, 5, 17, 33, 47, 3, 20, 16, 64, 9, 30]
    prompts = [rng.integers(0, 512, n).tolist() for n in lengths]
    new = 9
    batcher = _batcher(model, params)
    jobs = [batcher.submit(Job(p, new)) for p in prompts]
    batcher.run_until_idle()
    static = m1jax.generate(model, params, prompts, max_new_tokens=new)
    for b, job in enumerate(jobs):
        assert job.error is None and job.finish_reason == "length"
        assert job.token_ids == static.completions[b], f"request {b} vs the static batch"
    np.testing.assert_array_equal(sum(job.counts for job in jobs), static.routing.tokens_per_expert)
    np.testing.assert_array_equal(sum(job.calls for job in jobs), static.routing.expert_calls)
    pick = int(rng.integers(len(prompts)))
    alone = _batcher(model, params)
    single = alone.submit(Job(prompts[pick], new))
    alone.run_until_idle()
    assert single.token_ids == jobs[pick].token_ids
    np.testing.assert_array_equal(single.counts, jobs[pick].counts)
    assert batcher.busy_slots == 0 and batcher.index <= 1024


def test_seeded_sampling_is_independent_of_neighbours(model_and_params, rng):
    """A seeded sampled request draws the same tokens alone and among others; prompt scores equal a full forward."""
    model, params = model_and_params
    prompt = rng.integers(0, 512, 21).tolist()
    job = Job(prompt, 6, temperature=0.9, top_k=50, top_p=0.95, seed=1234, prompt_logprobs=True)
    alone = _batcher(model, params)
    alone.submit(job)
    alone.run_until_idle()
    crowd = _batcher(model, params)
    others = [crowd.submit(Job(rng.integers(0, 512, int(n)).tolist(), 8, temperature=1.0, seed=int(n)))
              for n in rng.integers(1, 40, 9)]
    twin = crowd.submit(Job(prompt, 6, temperature=0.9, top_k=50, top_p=0.95, seed=1234))
    crowd.run_until_idle()
    assert twin.token_ids == job.token_ids and all(o.error is None for o in others)
    logits = model.apply({"params": params}, jnp.asarray([prompt])).logits[0]
    want = np.asarray(jax.nn.log_softmax(logits, -1))[np.arange(len(prompt) - 1), prompt[1:]]
    got = np.asarray([s[0] for s in job.prompt_scores[1:]])
    assert job.prompt_scores[0] is None
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_stops_queue_bound_and_cancel(model_and_params, rng):
    model, params = model_and_params
    batcher = _batcher(model, params, max_queue=2)
    prompt = rng.integers(0, 512, 9).tolist()
    probe = batcher.submit(Job(prompt, 6))
    batcher.run_until_idle()
    stop_id = probe.token_ids[2]
    first = batcher.submit(Job(prompt, 6, stop_ids=(stop_id,)))
    cancelled = batcher.submit(Job(prompt, 6))
    with pytest.raises(QueueFull):
        batcher.submit(Job(prompt, 6))
    cancelled.cancel()
    batcher.run_until_idle()
    assert first.finish_reason == "stop" and first.token_ids == probe.token_ids[:probe.token_ids.index(stop_id) + 1]
    assert cancelled.finish_reason == "cancelled" and cancelled.done.is_set()
    text = " ".join(map(str, probe.token_ids))
    cut = text.index(" ", len(str(probe.token_ids[0])) + 1)
    stop = text[cut:cut + 3]  # a space and the start of the third token: it may also occur earlier
    stopped = batcher.submit(Job(prompt, 6, stop_strings=(stop,)))
    batcher.run_until_idle()
    assert stopped.finish_reason == "stop" and stopped.text == text[:text.index(stop)]
    with pytest.raises(ValueError, match="exceeds the server's context of 1024"):
        batcher.submit(Job(prompt, 1020))


def test_a_request_filling_the_whole_context_runs(model_and_params, rng):
    """prompt + max_new_tokens == max_context with a prompt that is not a multiple of the padding bucket."""
    model, params = model_and_params
    batcher = _batcher(model, params)
    short = batcher.submit(Job(rng.integers(0, 512, 5).tolist(), 40))
    full = batcher.submit(Job(rng.integers(0, 512, 17).tolist(), 1024 - 17))
    batcher.run_until_idle()
    assert short.finish_reason == full.finish_reason == "length" and len(full.token_ids) == 1024 - 17
