"""Continuous batching against its slow twins: m1jax.generate (one request at a time, and a static batch), and
m1jax.inference.sampling (per-row sampling)."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import m1jax
from m1jax.checkpoint.load import load_any
from m1jax.inference.sampling import filter_rows, row_sampling, sample_rows
from m1jax.serve.batcher import BUCKET, Batcher, Job, QueueFull, chunk_lengths

from .conftest import DECODE_STEPS, PREFILL_BATCH



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


def numpy_filter(scaled: np.ndarray, k: int, p: float):
    """One row's slow twin: keep the k largest (ties kept), then walk the kept tokens from most to least probable
    (float64) until their mass reaches p, keeping ties with the last one. Returns (kept, undecided): undecided marks
    the tokens that float32 rounding may decide either way: within 1e-6 (relative) of the k-th value or of the last
    kept probability without being equal to it, or whose more-likely mass lies within 1e-6 of p."""
    kth = np.sort(scaled)[::-1][min(k, scaled.size) - 1]
    kept = scaled >= kth
    undecided = (np.abs(scaled - kth) <= 1e-6 * max(1.0, abs(kth))) & (scaled != kth)
    if p < 1:
        probs = np.where(kept, np.exp(scaled.astype(np.float64) - scaled.max()), 0.0)
        probs /= probs.sum()
        mass, last = 0.0, None
        for i in np.argsort(-probs, kind="stable"):
            undecided[i] |= abs(mass - p) < 1e-6
            if mass >= p:
                break
            mass, last = mass + probs[i], probs[i]
        undecided |= (np.abs(probs - last) <= 1e-6 * last) & (probs != last)
        kept &= probs >= last
    return kept, undecided


def test_filter_rows_per_row_matches_numpy(rng):
    """sampling.filter_rows (the one implementation, for generate's static settings and the server's per-row ones)
    keeps in each row what the numpy twin keeps with that row's temperature, top-k and top-p, ties included."""
    batch, vocab = 7, 37
    logits = rng.standard_normal((batch, vocab)).astype(np.float32) * 3
    logits[0, 0], logits[0, 1:4] = logits[0].max() + 3, logits[0].max() + 1  # the 3rd value tied 3 ways (k = 3)
    logits[1, 3:6] = logits[1].max() + 4  # a three-way tie at the top, with most of the mass
    logits[2, 10] = 40.0  # one token holds nearly all the mass
    settings = [(0.7, 3, 1.0), (1.0, vocab, 0.5), (1.3, 10, 0.9), (1.0, vocab + 4, 0.3), (0.0, 2, 1.0),
                (2.0, 1, 0.2), (0.5, vocab, 1.0)]
    temperature, top_k, top_p = (np.asarray(c) for c in zip(*settings))
    got = np.asarray(filter_rows(jnp.asarray(logits), jnp.asarray(temperature, jnp.float32),
                                 jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32)))
    for b, (t, k, p) in enumerate(settings):
        scaled = logits[b] / np.float32(t if t > 0 else 1.0)
        kept, undecided = numpy_filter(scaled, k, p)
        decided = ~undecided
        np.testing.assert_array_equal(np.isfinite(got[b])[decided], kept[decided], err_msg=f"row {b} {settings[b]}")
        finite = np.isfinite(got[b])
        np.testing.assert_allclose(got[b][finite], scaled[finite], rtol=1e-6)  # XLA may divide by multiplying
    assert np.isfinite(got[0]).sum() == 4 and np.isfinite(got[1]).sum() == 3  # the ties were kept


def test_sample_rows_draws_each_row_alone(rng):
    """sample_rows: greedy rows take the first maximum; a drawn row's token depends on its own logits, settings and
    key only (alone, or beside greedy / filtered / unfiltered rows); filtered-out tokens are never drawn."""
    batch, vocab = 6, 29
    logits = jnp.asarray(rng.standard_normal((batch, vocab)) * 2, jnp.float32)
    temperature = jnp.asarray([0.0, 1.0, 0.8, 0.0, 1.5, 1.0], jnp.float32)
    top_k = jnp.asarray([vocab, vocab, 5, 3, vocab, 2], jnp.int32)
    top_p = jnp.asarray([1.0, 1.0, 0.9, 0.5, 0.6, 1.0], jnp.float32)
    draw = jax.jit(sample_rows, static_argnames="mode")
    assert row_sampling(np.asarray(temperature), np.asarray(top_k), np.asarray(top_p), vocab) == "filter"
    for trial in range(20):
        keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), batch)
        tokens = np.asarray(draw(logits, temperature, top_k, top_p, keys))
        greedy = np.asarray(jnp.argmax(logits, -1))
        assert tokens[0] == greedy[0] and tokens[3] == greedy[3]
        kept = np.isfinite(np.asarray(filter_rows(logits, temperature, top_k, top_p)))
        assert all(kept[b, tokens[b]] for b in range(batch))
        for b in (1, 2, 4, 5):
            alone = draw(logits[b:b + 1], temperature[b:b + 1], top_k[b:b + 1], top_p[b:b + 1], keys[b:b + 1])
            assert int(alone[0]) == tokens[b], (trial, b)
        unfiltered = temperature.at[2].set(0).at[4].set(0).at[5].set(0)
        assert row_sampling(np.asarray(unfiltered), np.asarray(top_k), np.asarray(top_p), vocab) == "draw"
        fast = draw(logits, unfiltered, top_k, top_p, keys, mode="draw")  # no row filters: the draws skip the sort
        np.testing.assert_array_equal(fast, draw(logits, unfiltered, top_k, top_p, keys))
        assert int(fast[1]) == tokens[1]
    none_drawn = jnp.zeros_like(temperature)
    assert row_sampling(np.asarray(none_drawn), np.asarray(top_k), np.asarray(top_p), vocab) == "greedy"
    np.testing.assert_array_equal(draw(logits, none_drawn, top_k, top_p, keys, mode="greedy"), greedy)
    with pytest.raises(ValueError, match="mode must be one of"):
        sample_rows(logits, temperature, top_k, top_p, keys, mode="nucleus")


def _batcher(model, params, **kw):
    """The live server's shapes (tests/serve/conftest.py), so both share compiled steps."""
    return Batcher(model, params, lambda ids: " ".join(map(str, ids)), **{
        "max_batch": 8, "max_context": 1024, "chunk_size": 32, "decode_steps": DECODE_STEPS,
        "prefill_batch": PREFILL_BATCH, **kw})


def test_greedy_equals_generate_alone_and_batched(model_and_params, rng):
    """More requests than slots, awkward prompt lengths, prefill groups, insertions between multi-step decode calls:
    each greedy completion equals the same request alone in the batcher and its row of one static m1jax.generate
    batch, and per-request routing counts sum to the static batch's (test_server compares one request with
    m1jax.generate on its prompt alone)."""
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
    np.testing.assert_array_equal(single.calls, jobs[pick].calls)
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
