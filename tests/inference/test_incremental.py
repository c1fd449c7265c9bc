"""Incremental decoding equals a full forward: chunked prefill (lightning state carried, softmax over the cache),
one-token steps (the recurrent lightning step), and left-padded rows, at every position."""
import numpy as np

import jax
import jax.numpy as jnp

from m1jax import M1ForCausalLM
from m1jax.inference import init_cache


def test_chunked_prefill_then_steps_match_a_full_forward_at_every_position(tiny_config, tiny_params, rng):
    cfg, params = tiny_config, tiny_params
    model = M1ForCausalLM(cfg)
    lengths = [37, 20]  # row 1 is left-padded by 17 slots
    padded = np.full((2, 37), 5, np.int32)
    for b, n in enumerate(lengths):
        padded[b, 37 - n:] = rng.integers(0, cfg.vocab_size, n)

    step = jax.jit(lambda p, cache, ids: model.apply({"params": p}, ids, cache=cache))
    cache = init_cache(cfg, 2, 45, start=[0, 17])  # 45 slots: more than used, not a multiple of anything
    pieces = []
    for begin, end in [(0, 11), (11, 22)] + [(t, t + 1) for t in range(22, 37)]:  # two chunks, then 15 steps
        out = step(params, cache, jnp.asarray(padded[:, begin:end]))
        if end == 11:  # row 1 has been padding only: its lightning states are exactly zero, it routed nothing
            states = np.stack([out.cache.layers[l]["state"] for l in (0, 2)])  # the lightning layers
            assert not np.any(states[:, 1]) and np.any(states[:, 0])
            np.testing.assert_allclose(out.routing["tokens_per_expert"].sum(-1), 11 * cfg.experts_per_token)
        cache = out.cache
        pieces.append(out.logits)
    assert int(cache.index) == 37
    incremental = np.asarray(jnp.concatenate(pieces, axis=1))

    # the reference: a plain forward where row 1's padding is its own segment (positions restart at its prompt)
    segments = jnp.asarray([[1] * 37, [0] * 17 + [1] * 20])
    full = jax.jit(lambda p, ids: model.apply({"params": p}, ids, segment_ids=segments).logits)(
        params, jnp.asarray(padded))
    for b, n in enumerate(lengths):
        want = np.asarray(full[b, 37 - n:])
        np.testing.assert_allclose(incremental[b, 37 - n:], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())

    assert len(cache.layers) == cfg.num_layers == 4  # [lightning, softmax] x 2 groups, one entry per layer
    state = cache.layers[2]["state"]
    assert state.shape == (2, cfg.num_heads, cfg.head_dim, cfg.head_dim) and state.dtype == jnp.float32
    assert cache.layers[3]["key"].shape == (2, cfg.num_kv_heads, 45, cfg.head_dim)


def test_decode_loop_updates_the_cache_in_place(tiny_config, tiny_params):
    """No step of the compiled decode loop copies a layer's key/value cache (it would cost a full read and write
    of the cache per token: at 1M context, more than the attention itself)."""
    from m1jax.inference.engine import _JITTED, Request, start
    request = Request(max_new_tokens=4)
    state = start(tiny_config, [[1] * 200], request)
    cache_shape = ",".join(map(str, state.cache.layers[1]["key"].shape))  # (B, K, S, D)
    compiled = _JITTED["decode"].lower(M1ForCausalLM(tiny_config), request.sampling, tiny_params, state,
                                       jnp.int32(4)).compile()
    copies = [line for line in compiled.as_text().splitlines()
              if " copy(" in line and (f"[{cache_shape}]" in line or f"[{cache_shape.split(',', 2)[2]}]" in line)]
    assert not copies, copies[:3]
