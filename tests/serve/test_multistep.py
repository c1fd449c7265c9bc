"""Several decode steps per device call, and what the host does between two calls: stop strings that end a row in
the middle of a call, per-row routing counts (the model's own statistics, row by row), log-probabilities only when
asked for, incremental text decoding."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import m1jax
from m1jax.checkpoint.load import load_any
from m1jax.config import RunPolicy
from m1jax.inference.cache import init_cache
from m1jax.params import draw_params
from m1jax.serve import steps
from m1jax.serve.batcher import Batcher, Job

from .conftest import DECODE_STEPS, PREFILL_BATCH, small_config


@pytest.fixture(scope="module")
def model_and_params(checkpoint):
    """The live server's checkpoint (the same config: the compiled steps are shared with test_server)."""
    config, params = load_any(checkpoint)
    return m1jax.M1ForCausalLM(config), params


def angle(ids):
    """A decoding that is concatenative and where a stop string cannot straddle tokens unnoticed: <12><7>..."""
    return "".join(f"<{i}>" for i in ids)


def _batcher(model, params, decode_text=angle, **kw):
    return Batcher(model, params, decode_text, **{"max_batch": 8, "max_context": 1024, "chunk_size": 32,
                                                  "decode_steps": DECODE_STEPS, "prefill_batch": PREFILL_BATCH, **kw})


def _run(batcher, jobs):
    for job in jobs:
        batcher.submit(job)
    batcher.run_until_idle()
    for job in jobs:
        assert job.error is None, job.error
    return jobs


def _count_launches(batcher):
    """The batcher's decode launches as they happen: the busy slots at each (a list that grows)."""
    launches, launch = [], batcher._launch
    batcher._launch = lambda: (launches.append(batcher.busy_slots), launch())
    return launches


def _outcome(job):
    return job.token_ids, job.text, job.finish_reason, job.counts.tolist(), job.calls.tolist()


def test_decode_steps_per_call_do_not_change_results(model_and_params, rng):
    """The same requests (greedy, seeded sampling, a stop id, a stop string, lengths that are not multiples of K)
    give the same tokens, text, finish reasons and routing counts with 1, 4 and 7 decode steps per call."""
    model, params = model_and_params
    probe = _run(_batcher(model, params), [Job(rng.integers(0, 512, 12).tolist(), 9)])[0]
    stop_id = probe.token_ids[5]
    prompts = [rng.integers(0, 512, n).tolist() for n in (3, 19, 40, 8, 25, 12)]

    def jobs():
        return [Job(prompts[0], 7), Job(prompts[1], 1), Job(prompts[2], 10, temperature=0.8, top_k=40, seed=5),
                Job(probe.prompt_ids, 9, stop_ids=(stop_id,)), Job(prompts[3], 13, stop_strings=(f"<{stop_id}>",)),
                Job(prompts[4], 11, temperature=1.0, top_p=0.9, seed=9, stop_strings=("<1",))]

    runs = {k: [_outcome(job) for job in _run(_batcher(model, params, decode_steps=k), jobs())]
            for k in (1, DECODE_STEPS, 7)}
    assert runs[DECODE_STEPS][3][0] == probe.token_ids[:probe.token_ids.index(stop_id) + 1]
    for k in (1, 7):
        for b, (one, other) in enumerate(zip(runs[DECODE_STEPS], runs[k])):
            assert one == other, f"request {b}: {DECODE_STEPS} vs {k} steps per call"


def test_no_decode_call_after_every_row_has_ended_by_length(model_and_params, rng):
    """The host counts what its launched calls will draw: once every live row will have reached its length, it
    launches no further call (such a call would only compute padding and hold back the next admissions). A request
    of 1 + 2K tokens takes exactly 2 calls of K steps; two of 1 + K and 1 + 2K tokens take 2 as well."""
    model, params = model_and_params
    k = DECODE_STEPS
    for lengths, calls in (((1 + 2 * k,), 2), ((1 + k, 1 + 2 * k), 2), ((2 + k,), 2)):
        batcher = _batcher(model, params)
        launches = _count_launches(batcher)
        jobs = _run(batcher, [Job(rng.integers(0, 512, 6).tolist(), n) for n in lengths])
        assert [len(job.token_ids) for job in jobs] == list(lengths)
        assert len(launches) == calls, (lengths, launches)


def test_a_wave_of_requests_enters_before_the_first_decode_call(model_and_params, rng):
    """Requests that arrive together, more than one prefill group of them, all enter the batch before a decode call
    runs (no K-step call for a batch of one group while the rest wait); a request arriving while the batch decodes
    joins it between calls as before. Results equal the requests run one at a time."""
    model, params = model_and_params
    prompts = [rng.integers(0, 512, int(n)).tolist() for n in rng.integers(3, 30, 8)]
    lengths = rng.integers(2, 3 * DECODE_STEPS, 8).tolist()
    batcher = _batcher(model, params)  # prefill groups of PREFILL_BATCH (4) rows at most, 8 slots
    launches = _count_launches(batcher)
    jobs = _run(batcher, [Job(p, n) for p, n in zip(prompts, lengths)])
    assert launches[0] == 8, launches
    alone = [_run(_batcher(model, params), [Job(p, n)])[0].token_ids for p, n in zip(prompts, lengths)]
    assert [job.token_ids for job in jobs] == alone

    # Two requests decoding, then a long prompt (4 chunks of 32) arrives: fewer requests come in than decode, so every
    # turn that prefills one of its chunks also launches a decode call, as before.
    late = _batcher(model, params)
    late_launches = _count_launches(late)
    for prompt in prompts[:2]:
        late.submit(Job(prompt, 8 * DECODE_STEPS))
    late._turn()
    late.submit(Job(rng.integers(0, 512, 4 * 32).tolist(), 2))
    for turn in range(3):
        late._turn()
        assert late.prefilling is not None and late.prefilling.chunk_index == turn + 1
        assert late_launches == [2] * (turn + 2)
    late.run_until_idle()


def test_late_arrivals_of_a_wave_join_before_its_first_decode_call(model_and_params, rng):
    """Requests that arrive after the first group of a wave was admitted, fewer than the rows already in, still
    enter before the first decode call while no row has decoded yet; once the batch has decoded, a late arrival
    no longer holds a call back. Results equal the requests run one at a time."""
    model, params = model_and_params
    # the first group's prompts take two chunks of 32 (two turns), the late ones any length
    prompts = [rng.integers(0, 512, int(n)).tolist() for n in [*rng.integers(33, 64, 4), *rng.integers(3, 30, 2)]]
    lengths = rng.integers(2, 3 * DECODE_STEPS, 6).tolist()
    batcher = _batcher(model, params)  # groups of PREFILL_BATCH (4) rows at most, 8 slots
    launches = _count_launches(batcher)
    jobs = [Job(p, n) for p, n in zip(prompts, lengths)]
    for job in jobs[:PREFILL_BATCH]:
        batcher.submit(job)
    batcher._turn()  # the first group's first chunk
    for job in jobs[PREFILL_BATCH:]:  # 2 late arrivals, fewer than the 4 rows about to enter
        batcher.submit(job)
    batcher._turn()  # its second chunk and the insert: 4 rows in, none decoded yet, 2 waiting
    assert batcher.busy_slots == PREFILL_BATCH and launches == [], launches
    batcher.run_until_idle()
    assert launches[0] == len(jobs), launches
    alone = [_run(_batcher(model, params), [Job(p, n)])[0].token_ids for p, n in zip(prompts, lengths)]
    assert [job.token_ids for job in jobs] == alone

    # rows that have decoded are not held back: 2 rows decoding, then a 2-chunk arrival (fewer than the rows in):
    # the turn of its first chunk launches a call too
    busy = _batcher(model, params)
    busy_launches = _count_launches(busy)
    for prompt in prompts[4:]:
        busy.submit(Job(prompt, 8 * DECODE_STEPS))
    busy._turn()
    assert busy_launches == [2]
    busy.submit(Job(prompts[0], 4))
    busy._turn()
    assert busy.prefilling is not None and busy.prefilling.chunk_index == 1 and busy_launches == [2, 2]
    busy.run_until_idle()


def test_a_group_still_on_the_device_does_not_hold_back_the_next_admission(model_and_params, rng):
    """Before the first decode call, a group's first tokens still being computed are not waited for while more
    requests can be admitted: the next group is prefilled first, the tokens are read later, in order, and results
    equal the requests run one at a time."""
    model, params = model_and_params
    prompts = [rng.integers(0, 512, int(n)).tolist() for n in rng.integers(3, 30, 2 * PREFILL_BATCH)]
    lengths = rng.integers(2, 3 * DECODE_STEPS, 2 * PREFILL_BATCH).tolist()
    batcher = _batcher(model, params)  # one chunk per prompt: a group is prefilled and inserted in one turn
    launches = _count_launches(batcher)
    batcher._ready = lambda record: False  # as on an accelerator still computing them
    jobs = [Job(p, n) for p, n in zip(prompts, lengths)]
    for job in jobs:
        batcher.submit(job)
    batcher._turn()  # group 1 in its slots; group 2 waiting
    assert batcher.busy_slots == PREFILL_BATCH and batcher.queue_depth == PREFILL_BATCH and launches == []
    assert len(batcher.in_flight) == 1 and "first" not in jobs[0].times  # not read: admission goes first
    batcher._turn()  # group 2 in, nothing coming: the call launches, and both groups' first tokens are read
    assert launches == [2 * PREFILL_BATCH] and all("first" in job.times for job in jobs)
    batcher.run_until_idle()
    alone = [_run(_batcher(model, params), [Job(p, n)])[0].token_ids for p, n in zip(prompts, lengths)]
    assert [job.token_ids for job in jobs] == alone


def test_a_stop_string_in_the_middle_of_a_call_discards_the_rest(model_and_params, rng):
    """The device draws K tokens per call, and the next call is launched before the host reads them; a stop string
    found on the host ends the request at its token: the tokens drawn after it (later in its call, and in the call
    launched since) are never recorded nor streamed, the text is cut before the string, and the routing counts are
    those of the same request ended by length at that token; its neighbour is not disturbed."""
    model, params = model_and_params
    prompt, neighbour = rng.integers(0, 512, 14).tolist(), rng.integers(0, 512, 30).tolist()
    seed, new = int(rng.integers(2**31)), 14
    probe = _run(_batcher(model, params), [Job(prompt, new, temperature=1.0, seed=seed)])[0].token_ids
    # a token that is the first of its kind and not the last of a call (token t > 0 comes from call ceil(t / K))
    stop_at = next((t for t in range(1, new - 1) if probe.index(probe[t]) == t and t % DECODE_STEPS), None)
    assert stop_at is not None, probe
    events = []
    job = Job(prompt, new, temperature=1.0, seed=seed, stop_strings=(f"<{probe[stop_at]}>",),
              on_event=lambda kind, data: events.append(data) if kind == "tokens" else None)
    crowd = _run(_batcher(model, params), [job, Job(neighbour, new)])
    assert job.finish_reason == "stop" and job.token_ids == probe[:stop_at + 1]
    assert job.text == angle(probe[:stop_at])
    assert "".join(e["text"] for e in events) == job.text
    assert [t for e in events for t in e["token_ids"]] == probe[:stop_at + 1]
    twin, alone = _run(_batcher(model, params), [Job(prompt, stop_at + 1, temperature=1.0, seed=seed),
                                                  Job(neighbour, new)])
    assert twin.token_ids == job.token_ids and twin.finish_reason == "length"
    np.testing.assert_array_equal(job.counts, twin.counts)
    np.testing.assert_array_equal(job.calls, twin.calls)
    assert crowd[1].token_ids == alone.token_ids
    np.testing.assert_array_equal(crowd[1].counts, alone.counts)


def _routing_problem(rng, **policy):
    config = small_config()
    model = m1jax.M1ForCausalLM(config, policy=RunPolicy(**policy))
    params = draw_params(config, int(rng.integers(2**31)))
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (3, 11)), jnp.int32)
    mask = np.ones((3, 11), np.int32)
    mask[0, :4] = 0  # left padding
    mask[2, 7:] = 0  # a finished row's tail
    return model, params, ids, jnp.asarray(mask), init_cache(config, 3, 16)


def test_row_routing_is_the_models_own_statistics_row_by_row(rng):
    """Dropless, with expert_threshold skipping some choices: each row's counts equal the model's own statistics with
    only that row real, do not move when the other rows change, and sum to the model's counts over the batch."""
    model, params, ids, mask, cache = _routing_problem(rng, expert_threshold=0.3)
    out, counts, calls = jax.jit(steps.routed_per_row, static_argnums=0)(model, params, ids, segment_ids=mask,
                                                                         cache=cache)
    np.testing.assert_array_equal(counts.sum(0), out.routing["tokens_per_expert"])
    np.testing.assert_array_equal(calls.sum(0), out.routing["expert_calls"])
    assert calls.sum() < counts.sum(), "the threshold skipped nothing: the calls check would be vacuous"
    others = ids.at[1:].set(jnp.asarray(rng.integers(0, model.config.vocab_size, (2, 11)), jnp.int32))
    _, moved, _ = steps.routed_per_row(model, params, others, segment_ids=mask, cache=cache)
    np.testing.assert_array_equal(moved[0], counts[0])
    for b in range(3):
        only = mask * (jnp.arange(3) == b)[:, None]
        own = model.apply({"params": params}, ids, segment_ids=only, cache=cache).routing
        np.testing.assert_array_equal(counts[b], own["tokens_per_expert"], err_msg=f"row {b}")
        np.testing.assert_array_equal(calls[b], own["expert_calls"], err_msg=f"row {b}")
        assert counts[b].sum() == mask[b].sum() * model.config.num_layers * model.config.experts_per_token


def test_row_routing_counts_capacity_drops_as_the_model_does(rng):
    """With a capacity factor, calls over an expert's capacity are dropped: per row they leave tokens_per_expert (the
    router's choices) and leave expert_calls, and the rows' sums equal the model's own counts."""
    model, params, ids, mask, cache = _routing_problem(rng, capacity_factor=0.5)
    out, counts, calls = steps.routed_per_row(model, params, ids, segment_ids=mask, cache=cache)
    own = out.routing
    np.testing.assert_array_equal(counts.sum(0), own["tokens_per_expert"])
    np.testing.assert_array_equal(calls.sum(0), own["expert_calls"])
    assert own["expert_calls"].sum() < own["tokens_per_expert"].sum(), "nothing was dropped: the test is vacuous"
    assert np.all(np.asarray(calls) <= np.asarray(counts))


def test_request_routing_is_the_same_alone_and_batched(model_and_params, rng):
    """A request's routing log counts its own tokens only: with expert_threshold (skipped calls) its counts and calls
    are the same alone and among other requests, and equal m1jax.generate's on its prompt alone."""
    model, params = model_and_params
    prompt, new = rng.integers(0, 512, 23).tolist(), 10
    alone = _run(_batcher(model, params), [Job(prompt, new, expert_threshold=0.3)])[0]
    others = [Job(rng.integers(0, 512, int(n)).tolist(), int(m), expert_threshold=0.3)
              for n, m in zip(rng.integers(1, 60, 6), rng.integers(2, 15, 6))]
    crowd = _run(_batcher(model, params), others[:3] + [Job(prompt, new, expert_threshold=0.3)] + others[3:])[3]
    assert crowd.token_ids == alone.token_ids
    np.testing.assert_array_equal(crowd.counts, alone.counts)
    np.testing.assert_array_equal(crowd.calls, alone.calls)
    reference = m1jax.generate(model, params, [prompt], max_new_tokens=new, expert_threshold=0.3)
    assert reference.completions[0] == alone.token_ids
    np.testing.assert_array_equal(alone.counts, reference.routing.tokens_per_expert)
    np.testing.assert_array_equal(alone.calls, reference.routing.expert_calls)
    assert alone.calls.sum() < alone.counts.sum(), "the threshold skipped nothing: the calls check would be vacuous"


def test_routing_statistics_only_when_a_row_asks(model_and_params, rng):
    """The decode call skips the per-row routing statistics when no live row wants them (OpenAI requests): the
    tokens are unchanged; a row that wants them among rows that do not still gets its own counts, equal to alone."""
    model, params = model_and_params
    batcher = _batcher(model, params)
    lowered = {flag: jax.jit(steps.decode_steps, static_argnums=(0, 1, 2), static_argnames="with_routing").lower(
        model, False, 2, params, batcher.slots, with_routing=flag).as_text() for flag in (False, True)}
    assert len(lowered[False]) < len(lowered[True])  # the statistics' work is gone from the compiled call
    prompts = [rng.integers(0, 512, int(n)).tolist() for n in rng.integers(3, 40, 4)]
    counted = _run(_batcher(model, params), [Job(p, 9) for p in prompts])
    plain = _run(_batcher(model, params), [Job(p, 9, want_routing=False) for p in prompts])
    assert [j.token_ids for j in plain] == [j.token_ids for j in counted]
    mixed = _run(_batcher(model, params), [Job(p, 9, want_routing=k == 1) for k, p in enumerate(prompts)])
    assert [j.token_ids for j in mixed] == [j.token_ids for j in counted]
    np.testing.assert_array_equal(mixed[1].counts, counted[1].counts)
    np.testing.assert_array_equal(mixed[1].calls, counted[1].calls)
    assert counted[1].counts.sum() > 0


def test_top_logprobs_only_when_a_row_asks(model_and_params, rng, monkeypatch):
    """The decode call computes the top-20 log-probabilities only in its top-20 variant (chosen when a live row
    asked for alternatives); a row that asked gets each token's log-prob and its top_logprobs alternatives (equal to
    a full forward's), the others None; rows that asked for none (top_logprobs 0) get the same log-probs from the
    variant without the top-k."""
    model, params = model_and_params
    batcher = _batcher(model, params)
    lowered = {n: jax.jit(steps.decode_steps, static_argnums=(0, 1, 2)).lower(
        model, n, 2, params, batcher.slots).as_text() for n in (None, 0, 20)}
    top20 = lambda text: [line for line in text.splitlines() if "top_k" in line and "k = 20" in line]
    assert top20(lowered[20]) and not top20(lowered[0]) and not top20(lowered[None])
    prompt = rng.integers(0, 512, 13).tolist()
    asked, plain = _run(batcher, [Job(prompt, 6, want_logprobs=True), Job(rng.integers(0, 512, 9).tolist(), 6)])
    assert all(entry is None for entry in plain.logprobs) and len(plain.logprobs) == 6
    full = prompt + asked.token_ids[:-1]
    logits = model.apply({"params": params}, jnp.asarray([full])).logits[0, len(prompt) - 1:]
    want = np.asarray(jax.nn.log_softmax(logits, -1))
    for t, (token, (logp, top_ids, top_lps)) in enumerate(zip(asked.token_ids, asked.logprobs)):
        assert top_ids[0] == token  # greedy: the drawn token is the most likely
        np.testing.assert_allclose(logp, want[t, token], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(top_lps, want[t, top_ids], rtol=1e-4, atol=1e-4)
        assert len(top_ids) == 20 and np.all(np.diff(top_lps) <= 0)
    alone = _run(batcher, [Job(prompt, 6)])[0]  # no row asks: the plain variant, the same tokens
    assert alone.token_ids == asked.token_ids and all(entry is None for entry in alone.logprobs)
    variants, decode = [], steps.JITTED["decode"]
    monkeypatch.setitem(steps.JITTED, "decode", lambda model, n, *rest, **kw: (variants.append(n),
                                                                               decode(model, n, *rest, **kw))[1])
    bare, three = _run(batcher, [Job(prompt, 6, want_logprobs=True, top_logprobs=0),
                                 Job(prompt, 6, want_logprobs=True, top_logprobs=3)])
    assert set(variants) == {20}  # one row wants alternatives: the top-20 variant, sliced per row
    variants.clear()
    only = _run(batcher, [Job(prompt, 6, want_logprobs=True, top_logprobs=0)])[0]
    assert set(variants) == {0}  # no row wants alternatives: the variant without the top-k
    for job, n in ((bare, 0), (three, 3), (only, 0)):
        assert job.token_ids == asked.token_ids
        np.testing.assert_allclose([e[0] for e in job.logprobs], [e[0] for e in asked.logprobs], rtol=1e-5, atol=1e-5)
        assert all(e[1] == a[1][:n] and len(e[2]) == n for e, a in zip(job.logprobs, asked.logprobs))
    with pytest.raises(ValueError, match="top_logprobs must be an integer in"):
        batcher.submit(Job(prompt, 6, want_logprobs=True, top_logprobs=21))


def test_incremental_text_decode(model_and_params):
    """Text is decoded a few tokens at a time (not the whole completion every token): the streamed pieces never hold
    half a UTF-8 character, add up to the whole decoding, and a stop string spanning multi-byte characters cuts it."""
    model, params = model_and_params
    calls = []

    def utf8(ids):
        calls.append(len(ids))
        return bytes(ids).decode("utf-8", errors="replace")

    batcher = _batcher(model, params, decode_text=utf8)
    text = "héllo wörld, 東京 → €uro. " * 12
    data = list(text.encode())
    pieces = []
    job = Job([1], len(data), on_event=lambda kind, d: pieces.append(d["text"]) if kind == "tokens" else None)
    assert not any(batcher._accept(job, token, None) for token in data[:-1])
    assert batcher._accept(job, data[-1], None) and job.finish_reason == "length"
    batcher._finish(job, job.finish_reason)
    assert job.text == text and "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert sum(calls) <= 8 * len(data), f"decoded {sum(calls)} ids for {len(data)} tokens"
    stop = "ld, 東京 → €u"
    pieces.clear()
    job = Job([1], len(data), stop_strings=(stop,), on_event=lambda kind, d: pieces.append(d["text"])
              if kind == "tokens" else None)
    end = next(t for t, token in enumerate(data) if batcher._accept(job, token, None))
    assert end == len(text[:text.index(stop) + len(stop)].encode()) - 1  # the token completing the string
    batcher._finish(job, job.finish_reason)
    assert job.finish_reason == "stop" and job.text == text[:text.index(stop)] == "".join(pieces)


def test_tensor_parallel_batcher_equals_generate(model_and_params, rng):
    """--mesh tensor=2 (two fake CPU devices): prefill groups, inserts and multi-step decode on sharded parameters
    give the tokens of m1jax.generate on one device."""
    from m1jax.model import param_logical_axes
    from m1jax.sharding import create_mesh, shard_params
    model, params = model_and_params
    mesh = create_mesh({"tensor": 2}, devices=jax.devices()[:2])
    sharded = m1jax.M1ForCausalLM(model.config, mesh=mesh)
    placed = shard_params(params, mesh, param_logical_axes(params))
    batcher = Batcher(sharded, placed, angle, max_batch=4, max_context=128, chunk_size=16, decode_steps=3,
                      prefill_batch=2, mesh=mesh)
    prompts = [rng.integers(0, 512, int(n)).tolist() for n in (5, 17, 9)]
    jobs = _run(batcher, [Job(p, 7) for p in prompts])
    reference = m1jax.generate(model, params, prompts, max_new_tokens=7)
    assert [job.token_ids for job in jobs] == reference.completions
