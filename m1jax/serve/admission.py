"""The host's half of admitting a prefill group (m1jax.serve.batcher): which waiting requests form the group, its
rows and chunks, their left-padded prompts, and their rows' sampling settings, built with numpy in one pass and sent
to the device as one int32 array (`host_settings`; `steps.admit_rows` unpacks it, resets the group's cache and
scatters logit biases and stop ids, sent as (row, id) pairs, into the (P, V) rows, in one call).
The rows' PRNG keys come from one batched call on the host's CPU device (`seed_keys`: the same key data as
jax.random.key(seed) of each seed), for seeds not seen before. Nothing here reads a device value back, so admitting
never waits for the accelerator.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np

from m1jax.inference.sampling import row_sampling
from m1jax.serve import steps
from m1jax.serve.job import draw_settings

BUCKET = 16  # prompts are left-padded to a multiple of this
# (row, id) pairs of logit biases and stop ids are padded to a power of two, ENTRIES_PER_ROW x P at least: a group
# size's warm-up compiles the one shape that requests with a few stop ids and no logit_bias use
ENTRIES_PER_ROW = 4
SEED_CACHE = 1 << 16  # seeds whose key data seed_keys keeps (then it starts over)
_SEED_KEYS: dict[tuple, tuple] = {}  # (PRNG implementation, x64) -> ({seed: row}, (n, 2) uint32 key data)


def padded_length(length: int) -> int:
    """A prompt's length rounded up to a multiple of BUCKET."""
    return -(-length // BUCKET) * BUCKET


def chunk_lengths(length: int, chunk_size: int) -> list[int]:
    """A multiple of BUCKET split into powers of two, chunk_size (a power of two >= BUCKET) at most."""
    out, rest, size = [], length, chunk_size
    while rest:
        while size > rest:
            size //= 2
        out.append(size)
        rest -= size
    return out


def group_rows(count: int, prefill_batch: int) -> int:
    """Rows of a prefill group of `count` requests: the next power of two, prefill_batch at most."""
    return min(1 << (count - 1).bit_length(), prefill_batch)


def group_size(waiting: Sequence, limit: int) -> int:
    """How many waiting requests, from the first, are prefilled together: `limit` at most, a solo request alone,
    all with the first one's expert_threshold and padded lengths within a factor 2 of each other."""
    head, count, low, high = waiting[0], 0, 0, 0
    for job in waiting:
        if count == limit or (count and (job.solo or head.solo)):
            break
        length = padded_length(len(job.prompt_ids))
        lo, hi = (length, length) if not count else (min(low, length), max(high, length))
        if job.expert_threshold != head.expert_threshold or hi > 2 * lo:
            break
        count, low, high = count + 1, lo, hi
    return count


def prompt_array(ids) -> np.ndarray | None:
    """The prompt's ids as a numpy integer array, None when they are not all plain integers."""
    try:
        array = np.asarray(ids)
    except (TypeError, ValueError, OverflowError):
        return None
    return array if array.ndim == 1 and array.dtype.kind in "iu" else None


def padded_prompts(jobs: list, rows: int, extra: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(padded (P, L + extra) int32: the prompts left-padded with 0 to the longest one's padded length L, the rows
    after the jobs repeating row 0, then `extra` columns of 0 (the batcher's one: each prefill chunk's ids and their
    next tokens are then one slice); starts (P,) int32: the column where each row's prompt begins). A job's
    prompt_array (made by Batcher.check) stands for its prompt_ids."""
    sizes = [len(job.prompt_ids) for job in jobs]
    length = padded_length(max(sizes))
    padded = np.zeros((rows, length + extra), np.int32)
    for j, job in enumerate(jobs):
        padded[j, length - sizes[j]:length] = job.prompt_ids if job.prompt_array is None else job.prompt_array
    padded[len(jobs):] = padded[0]
    starts = np.full((rows,), length - sizes[0], np.int32)
    starts[:len(jobs)] = [length - size for size in sizes]
    return padded, starts


@functools.cache
def _cpu_device():
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # no CPU backend: the default device
        return None


@jax.jit
def _keys_of(seeds: jax.Array) -> jax.Array:
    return jax.vmap(lambda seed: jax.random.key_data(jax.random.key(seed)))(seeds)


def _seed_keys(seeds: Sequence[int]) -> np.ndarray:
    with jax.default_device(_cpu_device()):
        return np.asarray(_keys_of(np.asarray(seeds, np.int64))).astype(np.uint32)


def warm_seed_keys(max_rows: int) -> None:
    """Compile seed_keys's padded call for every power of two up to the one that holds `max_rows` new seeds (a
    group's), so that the first group with many new seeds does not compile it while clients wait."""
    for size in (1 << i for i in range((max_rows - 1).bit_length() + 1)):
        _seed_keys([0] * size)


def seed_keys(seeds: Sequence[int]) -> np.ndarray:
    """(n, 2) uint32: the key data of jax.random.key(seed) for each seed (a Python int is taken as int64, as
    jax.random.key takes it). Seeds seen before are looked up (most requests keep the default seed); the others are
    computed in one call on the host's CPU device, padded to a power of two (few shapes to compile): reading it
    never waits for a decode call in flight on the accelerator."""
    setting = (jax.config.jax_default_prng_impl, jax.config.jax_enable_x64)
    row_of, table = _SEED_KEYS.get(setting, ({}, np.zeros((0, 2), np.uint32)))  # seed -> its row of the table
    new = [seed for seed in dict.fromkeys(seeds) if seed not in row_of]
    if new:
        if len(row_of) + len(new) > SEED_CACHE:  # start over, with this call's seeds
            row_of, table, new = {}, table[:0], list(dict.fromkeys(seeds))
        keys = _seed_keys(new + [0] * ((1 << (len(new) - 1).bit_length()) - len(new)))[:len(new)]
        row_of.update(zip(new, range(len(table), len(table) + len(new))))
        table = np.concatenate([table, keys])
        _SEED_KEYS[setting] = row_of, table
    return table[np.fromiter((row_of[seed] for seed in seeds), np.intp, len(seeds))]


def _pairs(pairs: list[tuple[int, int]], values: list[float] | None, rows: int):
    """(row, id) pairs (and their values) padded with row `rows` (dropped) to a power of two, ENTRIES_PER_ROW x
    rows at least."""
    size = max(ENTRIES_PER_ROW * rows, 1 << max(len(pairs) - 1, 0).bit_length())
    at = np.zeros((size, 2), np.int32)
    at[:, 0] = rows
    if pairs:
        at[:len(pairs)] = pairs
    if values is None:
        return at
    padded = np.zeros((size,), np.float32)
    padded[:len(values)] = values
    return at, padded


def host_settings(jobs: list, rows: int, vocab: int, starts: np.ndarray | None = None) -> tuple:
    """The host's half of steps.admit_rows for a group's P rows (the rows after the jobs repeat
    the first): (layout (P, bias pairs, stop pairs), packed int32 (the array steps.unpack_settings reads: per row
    temperature (float32 bits), top_k, top_p (float32 bits), key data (2 words), start (`starts`, else 0); then the
    logit-bias (row, id, value bits) triples and the stop (row, id) pairs, each padded as `_pairs` does; stop ids
    outside [0, vocab) are left out), sampling (sample_rows's mode for these rows)). One array is one transfer."""
    picked = jobs + [jobs[0]] * (rows - len(jobs))
    temperature, top_k, top_p = draw_settings(picked, vocab)
    per_row = np.zeros((rows, steps.SETTINGS_COLUMNS), np.int32)
    per_row[:, 0] = np.asarray(temperature, np.float32).view(np.int32)
    per_row[:, 1] = top_k
    per_row[:, 2] = np.asarray(top_p, np.float32).view(np.int32)
    per_row[:, 3:5] = seed_keys([job.seed for job in picked]).view(np.int32)
    if starts is not None:
        per_row[:, 5] = starts
    bias_at, bias = [], []
    for j, job in enumerate(picked):
        if job.logit_bias:
            bias_at.extend((j, token) for token in job.logit_bias)
            bias.extend(job.logit_bias.values())
    bias_at, bias = _pairs(bias_at, bias, rows)
    stop_at = _pairs([(j, i) for j, job in enumerate(picked) for i in job.stop_ids if 0 <= i < vocab], None, rows)
    triples = np.concatenate([bias_at, bias.view(np.int32)[:, None]], 1)
    packed = np.concatenate([per_row.ravel(), triples.ravel(), stop_at.ravel()])
    return (rows, len(bias_at), len(stop_at)), packed, row_sampling(temperature, top_k, top_p, vocab)


def rows_that_fit(prompts: Sequence[int], outputs: Sequence[int], least: int, live_end: int | None,
                  context: int) -> tuple[int, int]:
    """How many of a group's pending rows, from the first, a batch can take now, and the write index they need
    (count, index): with prompts[i] and outputs[i] (a row's prompt length and max_new_tokens), the index must be at
    least `least` (the live rows' age) and each chosen prompt's length (the prompts end at it; their left padding
    may wrap to the end of the cache, never visible), and neither the live rows (ending `live_end` slots after the
    current index; None: no live row) nor the longest output of the chosen rows may run past `context` slots.
    Numpy over the rows (running maxima) instead of a loop over them."""
    if not len(prompts):
        return 0, 0
    index = np.maximum(least, np.maximum.accumulate(np.asarray(prompts, np.int64)))
    end = index + np.maximum.accumulate(np.asarray(outputs, np.int64))
    if live_end is not None:
        end = np.maximum(end, index + live_end)
    over = end > context
    count = int(over.argmax()) if over.any() else len(prompts)
    return count, int(index[count - 1]) if count else 0


def prompt_scores(jobs: list, scores: list, length: int) -> None:
    """Each job with prompt_logprobs gets its prompt_scores from the prefill chunks' host scores (log p, top ids,
    top log-probs), each (P, C...), of prompts left-padded to `length`: None for the first token."""
    for j, job in enumerate(jobs):
        if job.prompt_logprobs:
            logp, top_ids, top_lps = (np.concatenate([s[i][j] for s in scores]) for i in range(3))
            pad = length - len(job.prompt_ids)
            job.prompt_scores = [None] + [(float(logp[pad + t - 1]), top_ids[pad + t - 1].tolist(),
                                           top_lps[pad + t - 1].tolist()) for t in range(1, len(job.prompt_ids))]
