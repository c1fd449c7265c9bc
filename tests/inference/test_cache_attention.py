"""Attention over the inference cache: the blockwise and one-token paths against a float64 numpy twin.

The twin is written here, slot by slot, from the rule "query slot i of row b sees key slots start_b <= j <= i, and
always its own slot i" (a padded row whose start lies after i still attends to itself); it shares no code with
m1jax.layers.softmax_attention, whose own dense reference is checked against it too.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from m1jax.layers import softmax_attention
from m1jax.layers.softmax_attention import (blockwise_cache_attention, cached_attention, causal_attention,
                                            decode_attention, reference_cache_attention, split_decode_attention)


def slow_cache_attention(q, key_cache, value_cache, query_slots, start):
    """q (B, T, H, D) at slots query_slots (T,); caches (B, K, S, D); start (B,) -> (B, T, H, D) float64."""
    q, keys, values = (np.asarray(a, np.float64) for a in (q, key_cache, value_cache))
    batch, length, heads, dim = q.shape
    group = heads // keys.shape[1]
    out = np.zeros(q.shape)
    for b in range(batch):
        for t, i in enumerate(np.asarray(query_slots).tolist()):
            seen = [j for j in range(keys.shape[2]) if int(start[b]) <= j <= i or j == i]
            for h in range(heads):
                scores = keys[b, h // group, seen] @ q[b, t, h] / np.sqrt(dim)
                weights = np.exp(scores - scores.max())
                out[b, t, h] = weights @ values[b, h // group, seen] / weights.sum()
    return out


def random_cache(rng, batch, kv_heads, slots, dim, dtype=np.float32):
    keys = rng.standard_normal((batch, kv_heads, slots, dim)).astype(dtype)
    values = rng.standard_normal((batch, kv_heads, slots, dim)).astype(dtype)
    return jnp.asarray(keys), jnp.asarray(values)


@pytest.mark.parametrize("index,length,block", [(0, 13, 5), (37, 11, 8), (50, 29, 16), (0, 79, 32)])
def test_blockwise_matches_dense(index, length, block, rng):
    batch, heads, kv_heads, dim, slots = 3, 6, 2, 8, 81  # 81 slots: no block size divides it
    keys, values = random_cache(rng, batch, kv_heads, slots, dim)
    q = jnp.asarray(rng.standard_normal((batch, length, heads, dim)), jnp.float32)
    start = jnp.asarray([0, 4, min(index + length - 1, 45)], jnp.int32)  # the last row is padding up to late
    slots_of_queries = index + jnp.arange(length, dtype=jnp.int32)
    got = jax.jit(blockwise_cache_attention, static_argnums=5)(q, keys, values, slots_of_queries, start, block)
    want = slow_cache_attention(q, keys, values, slots_of_queries, start)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, equal_nan=False)
    np.testing.assert_allclose(reference_cache_attention(q, keys, values, slots_of_queries, start), want,
                               rtol=2e-5, atol=2e-5, equal_nan=False)


def test_decode_matches_dense_and_ignores_later_slots(rng):
    batch, heads, kv_heads, dim, slots = 4, 4, 1, 16, 45
    keys, values = random_cache(rng, batch, kv_heads, slots, dim)
    q = jnp.asarray(rng.standard_normal((batch, 1, heads, dim)), jnp.float32)
    index, start = jnp.int32(30), jnp.asarray([0, 3, 17, 30], jnp.int32)
    got = decode_attention(q, keys, values, index, start)
    np.testing.assert_allclose(got, slow_cache_attention(q, keys, values, index[None], start), rtol=2e-5,
                               atol=2e-5, equal_nan=False)
    scrambled = keys.at[:, :, 31:].set(1e3).at[0, :, 0].set(1e3)  # later slots; row 0 sees slot 0
    assert not np.allclose(decode_attention(q, scrambled, values, index, start)[0], got[0])
    np.testing.assert_allclose(decode_attention(q, scrambled, values, index, start)[1:], got[1:], rtol=1e-6)
    one_key = decode_attention(q, keys, values, index, start)[3, 0]  # start == index: only its own slot is visible
    np.testing.assert_allclose(one_key, jnp.repeat(values[3, :, 30], heads // kv_heads, axis=0), rtol=1e-5)


@pytest.mark.parametrize("chunk", [64, 16, 192])
def test_split_decode_matches_the_slot_by_slot_twin(chunk, rng):
    """Split-KV decode at 192 slots in 3, 12 or 1 chunks: rows whose visible slots lie in one chunk, span several,
    or are only the query's own (start == index), so some chunks see nothing; grouped heads; the slots after the
    query scrambled change nothing."""
    batch, heads, kv_heads, dim, slots = 4, 6, 2, 8, 192
    keys, values = random_cache(rng, batch, kv_heads, slots, dim)
    q = jnp.asarray(rng.standard_normal((batch, 1, heads, dim)), jnp.float32)
    index, start = jnp.int32(150), jnp.asarray([0, 70, 130, 150], jnp.int32)
    attend = jax.jit(split_decode_attention, static_argnums=5)
    got = attend(q, keys, values, index, start, chunk)
    np.testing.assert_allclose(got, slow_cache_attention(q, keys, values, index[None], start), rtol=2e-5,
                               atol=2e-5, equal_nan=False)
    scrambled = keys.at[:, :, 151:].set(1e3)
    np.testing.assert_allclose(attend(q, scrambled, values, index, start, chunk), got, rtol=1e-6)
    with pytest.raises(ValueError, match="does not divide"):
        split_decode_attention(q, keys, values, index, start, 100)


def test_split_decode_is_chosen_by_cache_size(rng, monkeypatch):
    """Caches of at least DECODE_SPLIT_MIN_SLOTS slots take the split form (the largest divisor up to
    DECODE_SPLIT_CHUNK), none when it is None, and a decode step through cached_attention gives the dense result."""
    shipped = softmax_attention.DECODE_SPLIT_MIN_SLOTS
    assert softmax_attention.split_chunk(shipped) == softmax_attention.DECODE_SPLIT_CHUNK  # 32K: a multiple of it
    assert softmax_attention.split_chunk(shipped - 64) is None and softmax_attention.split_chunk(2048) is None
    monkeypatch.setattr(softmax_attention, "DECODE_SPLIT_MIN_SLOTS", None)
    assert softmax_attention.split_chunk(1 << 20) is None
    monkeypatch.setattr(softmax_attention, "DECODE_SPLIT_MIN_SLOTS", 128)
    monkeypatch.setattr(softmax_attention, "DECODE_SPLIT_CHUNK", 64)
    assert softmax_attention.split_chunk(64) is None  # below the threshold
    assert softmax_attention.split_chunk(192) == 64 and softmax_attention.split_chunk(1 << 20) == 64
    assert softmax_attention.split_chunk(131) is None  # a prime: no divisor of at least 64 below it
    batch, heads, kv_heads, dim, slots = 2, 4, 2, 8, 192
    keys, values = random_cache(rng, batch, kv_heads, slots, dim)
    q = jnp.asarray(rng.standard_normal((batch, 1, heads, dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((batch, 1, kv_heads, dim)), jnp.float32) for _ in range(2))
    index, start = jnp.int32(140), jnp.asarray([0, 100], jnp.int32)
    split, _ = cached_attention(q, k, v, {"key": keys, "value": values}, index, start)
    monkeypatch.setattr(softmax_attention, "DECODE_SPLIT_MIN_SLOTS", None)
    dense, _ = cached_attention(q, k, v, {"key": keys, "value": values}, index, start)
    np.testing.assert_allclose(split, dense, rtol=2e-5, atol=2e-5)


def test_first_unpadded_chunk_takes_the_causal_path_with_the_same_result(rng):
    """fresh=True (a cache nothing was written to) takes the causal path; the blockwise path over the cache gives the
    same attention, at slot 0, at slot 5 of rows padded up to it, and to the real tokens of left-padded rows."""
    batch, length, heads, kv_heads, dim, slots = 2, 19, 4, 2, 8, 40
    q = jnp.asarray(rng.standard_normal((batch, length, heads, dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((batch, length, kv_heads, dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((batch, length, kv_heads, dim)), jnp.float32)
    cache = {"key": jnp.zeros((batch, kv_heads, slots, dim)), "value": jnp.zeros((batch, kv_heads, slots, dim))}
    attend = jax.jit(cached_attention, static_argnames="fresh")
    out, new_cache = attend(q, k, v, cache, jnp.int32(0), jnp.zeros((batch,), jnp.int32), fresh=True)
    np.testing.assert_allclose(out, causal_attention(q, k, v), rtol=1e-5, atol=1e-6)
    blockwise, blockwise_cache = attend(q, k, v, cache, jnp.int32(0), jnp.zeros((batch,), jnp.int32))
    np.testing.assert_allclose(blockwise, out, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(blockwise_cache["key"], new_cache["key"])
    np.testing.assert_array_equal(new_cache["key"][:, :, :length], k.transpose(0, 2, 1, 3))
    assert not np.any(new_cache["key"][:, :, length:])
    # the same chunk written at slot 5 of a row padded up to slot 5 gives the same attention
    shifted, _ = attend(q, k, v, cache, jnp.int32(5), jnp.full((batch,), 5, jnp.int32))
    np.testing.assert_allclose(shifted, out, rtol=2e-5, atol=2e-5)
    # a fresh chunk of left-padded rows: the real tokens' attention is the blockwise path's over the cache
    start = jnp.asarray([4, 0], jnp.int32)
    padded, _ = attend(q, k, v, cache, jnp.int32(0), start, fresh=True)
    blockwise, _ = attend(q, k, v, cache, jnp.int32(0), start)
    np.testing.assert_allclose(padded[0, 4:], blockwise[0, 4:], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(padded[1], blockwise[1], rtol=2e-5, atol=2e-5)
    assert not np.allclose(padded[0, 4:], out[0, 4:], atol=1e-3)  # the padding is not seen


def test_bfloat16_cache_stays_close_to_float32(rng):
    keys, values = random_cache(rng, 2, 2, 70, 16)
    q = jnp.asarray(rng.standard_normal((2, 9, 4, 16)), jnp.float32)
    start, slots = jnp.asarray([0, 7], jnp.int32), 40 + jnp.arange(9, dtype=jnp.int32)
    got = blockwise_cache_attention(q.astype(jnp.bfloat16), keys.astype(jnp.bfloat16), values.astype(jnp.bfloat16),
                                    slots, start, 16)
    assert got.dtype == jnp.bfloat16
    want = slow_cache_attention(q, keys, values, slots, start)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.05, rtol=0.05, equal_nan=False)
