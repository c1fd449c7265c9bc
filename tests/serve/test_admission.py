"""The host's admission helpers (m1jax.serve.admission) against the per-request code they replace: the batched PRNG
keys, the rows' settings scattered on the device (with the cache reset, in one call), group selection, padded
prompts, the rows that fit into the batch; and the batched token intake (TokenOutput._accept_tokens) against one
token at a time."""
import numpy as np
import pytest

import jax

from m1jax import M1Config
from m1jax.inference.cache import init_cache
from m1jax.serve import admission, steps
from m1jax.serve.job import Job, TokenOutput, sampling_mode

SEEDS = [0, 1, 7, 1234, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 5, 2**40 + 3, 12345678901, -1, -2**31, -2**63,
         2**63 - 1]


def test_seed_keys_equal_each_seeds_key(monkeypatch):
    """One batched call gives every seed the key data of jax.random.key(seed) (so outputs do not change)."""
    one_by_one = np.stack([np.asarray(jax.random.key_data(jax.random.key(seed))) for seed in SEEDS])
    got = admission.seed_keys(SEEDS)
    assert got.dtype == np.uint32 and got.shape == one_by_one.shape
    np.testing.assert_array_equal(got, one_by_one)
    np.testing.assert_array_equal(admission.seed_keys([np.int64(2**40 + 3), 1]), one_by_one[[8, 1]])
    with pytest.raises(OverflowError):  # as jax.random.key(2**64 - 1) raises
        admission.seed_keys([2**64 - 1])
    # looked up once seen (the cache), computed when new, in any mix and order: the same key data
    admission._SEED_KEYS.clear()
    order = np.random.default_rng(0).permutation(len(SEEDS))
    for part in (order[:3], order, order[5:], order[::-1]):
        np.testing.assert_array_equal(admission.seed_keys([SEEDS[i] for i in part]), one_by_one[part])
    monkeypatch.setattr(admission, "SEED_CACHE", 5)  # a full cache starts over
    admission._SEED_KEYS.clear()
    for part in (order[:3], order[3:6], order[:4], order[6:11], order[::-1][:5]):
        np.testing.assert_array_equal(admission.seed_keys([SEEDS[i] for i in part]), one_by_one[part])
        assert len(next(iter(admission._SEED_KEYS.values()))[0]) <= 5


def dense_settings(jobs, rows, vocab):
    """The slow twin: the per-row loops and one key_data call per row that admission.host_settings and
    steps.admit_rows replace."""
    pick = lambda j: jobs[j] if j < len(jobs) else jobs[0]
    bias = np.zeros((rows, vocab), np.float32)
    stop = np.zeros((rows, vocab), bool)
    for j in range(rows):
        for token, value in (pick(j).logit_bias or {}).items():
            bias[j, token] = value
        stop[j, [i for i in pick(j).stop_ids if 0 <= i < vocab]] = True
    keys = np.stack([np.asarray(jax.random.key_data(jax.random.key(pick(j).seed))) for j in range(rows)])
    temperature = np.asarray([pick(j).temperature for j in range(rows)], np.float32)
    top_k = np.asarray([pick(j).top_k or vocab for j in range(rows)], np.int32)
    top_p = np.asarray([1.0 if pick(j).top_p is None else pick(j).top_p for j in range(rows)], np.float32)
    return temperature, top_k, top_p, bias, keys.astype(np.uint32), stop


@pytest.mark.parametrize("rows", [1, 4, 8])
def test_admitted_row_settings_equal_the_dense_rows(rows, rng):
    """Settings, logit biases and stop ids (out-of-range ones left out), rows past the jobs repeating the first,
    scattered on the device by the batcher's admission call, equal the dense rows built on the host; more pairs than
    ENTRIES_PER_ROW x P too."""
    vocab = 97
    jobs = [Job([1], 2, temperature=0.7, top_k=5, top_p=0.9, seed=3, stop_ids=(0, 96, 97, -1),
                logit_bias={5: 2.5, 96: -100.0, 0: 0.1})]
    for j in range(1, rows - rows // 4):
        bias = {int(t): float(rng.normal()) for t in rng.choice(vocab, 90 if j == 1 else int(rng.integers(0, 30)),
                                                                      replace=False)}
        jobs.append(Job([1], 2, temperature=float(j % 2), top_k=None if j % 3 else 7, seed=int(rng.integers(2**40)),
                        stop_ids=tuple(int(i) for i in rng.integers(0, vocab, int(rng.integers(0, 4)))),
                        logit_bias=bias or None))
    want = dense_settings(jobs, rows, vocab)
    # the batcher's one call: the settings beside the cache reset for the rows' starts (steps.reset_rows)
    config = M1Config(vocab_size=vocab, hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8, num_experts=2,
                      experts_per_token=1, expert_size=16, layer_types=("lightning", "softmax"), rotary_dim=4)
    starts = rng.integers(0, 32, rows).astype(np.int32)
    stale = lambda: jax.tree.map(lambda a: a + 1, init_cache(config, rows, 32))  # a used cache: nonzero
    layout, packed, mode = admission.host_settings(jobs, rows, vocab, starts)
    cache, settings = jax.device_get(steps.JITTED["admit"](vocab, layout, stale(), packed))
    for name, a, b in zip(("temperature", "top_k", "top_p", "bias", "keys", "stop"), settings, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    reset = jax.device_get(steps.reset_rows(stale(), jax.numpy.asarray(starts)))
    assert cache.fresh and jax.tree.structure(cache) == jax.tree.structure(reset)
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(reset)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert mode == sampling_mode(jobs, vocab)


def test_rows_that_fit_equals_the_loop(rng):
    """rows_that_fit (running maxima in numpy) chooses the rows and index that the batcher's per-row loop chose."""

    def loop(prompts, outputs, least, live_end, context):
        count, index, prompt, output = 0, 0, 0, 0
        for length, out in zip(prompts, outputs):
            at = max(least, prompt, length)
            if max(-float("inf") if live_end is None else live_end + at, at + max(output, out)) > context:
                break
            count, index, prompt, output = count + 1, at, max(prompt, length), max(output, out)
        return count, index

    assert admission.rows_that_fit([], [], 3, None, 64) == (0, 0)
    for _ in range(500):
        n = int(rng.integers(1, 12))
        prompts, outputs = rng.integers(1, 40, n).tolist(), rng.integers(1, 40, n).tolist()
        least = int(rng.integers(0, 40))
        live_end = None if rng.random() < 0.3 else int(rng.integers(-20, 60))
        context = int(rng.integers(20, 100))
        assert admission.rows_that_fit(prompts, outputs, least, live_end, context) == \
            loop(prompts, outputs, least, live_end, context)


def test_group_size_and_padded_prompts_equal_the_loops(rng):
    """group_size takes what the per-request loop took (limit, solo, threshold, lengths within a factor 2), and
    padded_prompts pads as before, from prompt_ids or from the checked prompt_array."""

    def loop(waiting, limit):
        padded_length = lambda job: -(-len(job.prompt_ids) // admission.BUCKET) * admission.BUCKET
        jobs = []
        for job in waiting:
            if len(jobs) == limit or (jobs and (job.solo or jobs[0].solo)):
                break
            lengths = [padded_length(j) for j in jobs] + [padded_length(job)]
            if job.expert_threshold != waiting[0].expert_threshold or max(lengths) > 2 * min(lengths):
                break
            jobs.append(job)
        return len(jobs)

    for _ in range(300):
        waiting = [Job(rng.integers(0, 50, int(rng.integers(1, 90))).tolist(), 2,
                       expert_threshold=None if rng.random() < 0.9 else 0.3) for _ in range(int(rng.integers(1, 12)))]
        for job in waiting:
            job.solo = bool(rng.random() < 0.05)
        limit = int(rng.integers(1, 10))
        count = admission.group_size(waiting, limit)
        assert count == loop(waiting, limit)
        jobs = waiting[:count]
        rows = 1 << (count - 1).bit_length()
        for job in jobs:
            job.prompt_array = admission.prompt_array(job.prompt_ids).astype(np.int32) if rng.random() < 0.5 else None
        padded, starts = admission.padded_prompts(jobs, rows)
        window, same = admission.padded_prompts(jobs, rows, extra=1)  # the batcher's: a column of 0 after them
        np.testing.assert_array_equal(window, np.pad(padded, ((0, 0), (0, 1))))
        np.testing.assert_array_equal(same, starts)
        length = max(-(-len(job.prompt_ids) // admission.BUCKET) * admission.BUCKET for job in jobs)
        want = np.zeros((rows, length), np.int32)
        for j in range(rows):
            ids = jobs[j if j < count else 0].prompt_ids
            want[j, length - len(ids):] = ids
            assert starts[j] == length - len(ids)
        np.testing.assert_array_equal(padded, want)
        assert padded.dtype == starts.dtype == np.int32
    assert admission.prompt_array([1, 2.5]) is None and admission.prompt_array([2**70]) is None
    assert admission.prompt_array([True, 3]).tolist() == [1, 3]


class Text(TokenOutput):
    metrics = None

    @staticmethod
    def decode_text(ids):
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("stop", [dict(), dict(stop_strings=("ld, 東",)), dict(stop_ids=(ord(","),)),
                                  dict(stop_strings=("zz",), max_new=30), dict(stop_strings=("€", "o. h")),
                                  dict(stop_ids=(ord("."),), stop_strings=("wör",))])
def test_accept_tokens_equals_accept_one_by_one(stop, rng):
    """Tokens taken a call's worth at a time (one detokenization and one event per run) give the text, token ids,
    log-probs, end and streamed text and tokens of the slow twin, which takes them one at a time."""
    data = list("héllo wörld, 東京 → €uro. ".encode() * 3)
    stop = dict(stop)
    max_new = stop.pop("max_new", len(data))

    def run(chunked):
        events = []
        job = Job([1], max_new, on_event=lambda kind, d: events.append((kind, dict(d))), **stop)
        out, at, end = Text(), 0, None
        while end is None and at < len(data):
            n = int(rng.integers(1, 9)) if chunked else 1
            tokens = data[at:at + n]
            scores = [(float(t), [t], [0.0]) for t in tokens]
            got = out._accept_tokens(job, tokens, scores) if chunked else out._accept_each(job, tokens, scores)
            end = None if got is None else at + got
            at += n
        out._finish(job, job.finish_reason)
        streamed = ("".join(d["text"] for k, d in events if k == "tokens"),
                    [t for k, d in events if k == "tokens" for t in d["token_ids"]],
                    [x for k, d in events if k == "tokens" for x in d["logprobs"]])
        steps = [d["step"] for k, d in events if k == "tokens" and d["token_ids"]]
        assert steps == sorted(steps) and events[-1][0] == "done", events[-3:]
        return (end, job.text, job.token_ids, job.logprobs, job.finish_reason), streamed, len(events)

    one, streamed, count = run(False)
    assert one[0] is not None and streamed == (one[1], one[2], one[3])
    for _ in range(3):
        got, got_streamed, got_count = run(True)
        assert got == one and got_streamed == streamed
        # a run is one event; with stop strings a run may be replayed one token at a time (one that a stop string
        # ends, or whose text ends in an incomplete character), so fewer events is not guaranteed there
        assert got_count < count or "stop_strings" in stop


def test_a_run_is_detokenized_once():
    """A run of tokens without a stop costs one event and two decodes (the incremental window), not two per token."""
    calls = []

    class Counting(Text):
        @staticmethod
        def decode_text(ids):
            calls.append(len(ids))
            return Text.decode_text(ids)
    events = []
    job = Job([1], 100, stop_strings=("never",), on_event=lambda kind, d: events.append(d))
    out = Counting()
    assert out._accept_tokens(job, list(b"hello world"), None) is None
    assert len(calls) == 2 and len(events) == 1 and events[0]["token_ids"] == list(b"hello world")
    assert job.text == "hello world" and events[0]["text"] == "hello world" and events[0]["step"] == 0


def test_warm_seed_keys_compiles_every_size_a_group_of_new_seeds_can_take():
    """After warm_seed_keys(48), a group of up to 48 new seeds (padded to at most 64) compiles nothing new."""
    admission.warm_seed_keys(48)
    compiled = admission._keys_of._cache_size()
    for count in (1, 3, 17, 39, 48):
        admission.seed_keys(list(range(10_000 * count, 10_000 * count + count)))
    assert admission._keys_of._cache_size() == compiled
