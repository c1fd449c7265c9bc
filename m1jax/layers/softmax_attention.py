"""Softmax attention layer of M1: grouped-query attention with partial RoPE, no biases, no qk-norm, scale 1/sqrt(D).

On GPU with bf16/fp16 activations and no packing mask it runs cuDNN's flash attention through
`jax.nn.dot_product_attention(implementation="cudnn")`; elsewhere XLA's implementation.

Inference keeps a key/value cache per layer, (B, K, S, D) for S cache slots. Every row of a batch writes slot
`index` at the same step (prompts are left-padded); slots before a row's `start` hold padding. A query at slot i
sees the keys at slots j with start <= j <= i (and always its own slot, so a padding query is never left with no
key). The cache keeps (B, K, S, D) rather than (B, S, K, D): attention is then a matmul batched over (B, K), the
leading axes, and a decode step reads the cache in place instead of transposing it.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from m1jax.config import M1Config
from m1jax.layers.projection import projection
from m1jax.layers.rope import apply_rope

CACHE_BLOCK = 1024  # key slots per step of the blockwise (online-softmax) attention over a cache


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """q: (B, T, H, D); k, v: (B, T, K, D); segment_ids: (B, T) or None. Returns (B, T, H, D).

    Token i attends to tokens j <= i of its own segment (packed documents never see each other).
    """
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # (B, 1, T, T)
    use_cudnn = (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and mask is None)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, scale=q.shape[-1] ** -0.5,
                                        implementation="cudnn" if use_cudnn else None)


def _visible(query_slots: jax.Array, key_slots: jax.Array, start: jax.Array) -> jax.Array:
    """(B, T, S') bool: key slot j is visible to query slot i of row b iff start_b <= j <= i, or j == i."""
    i, j = query_slots[None, :, None], key_slots[None, None, :]
    return ((j >= start[:, None, None]) & (j <= i)) | (j == i)


def reference_cache_attention(q: jax.Array, key_cache: jax.Array, value_cache: jax.Array, query_slots: jax.Array,
                              start: jax.Array) -> jax.Array:
    """The slow twin: dense float32 softmax over every cache slot. q: (B, T, H, D) at slots query_slots (T,);
    key_cache, value_cache: (B, K, S, D); start: (B,). Returns (B, T, H, D) in q.dtype."""
    batch, length, heads, dim = q.shape
    kv_heads, slots = key_cache.shape[1], key_cache.shape[2]
    qg = q.astype(jnp.float32).reshape(batch, length, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, key_cache.astype(jnp.float32)) * dim ** -0.5
    visible = _visible(query_slots, jnp.arange(slots), start)[:, None, None]  # (B, 1, 1, T, S)
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, value_cache.astype(jnp.float32))
    return out.reshape(batch, length, heads, dim).astype(q.dtype)


def decode_attention(q: jax.Array, key_cache: jax.Array, value_cache: jax.Array, index: jax.Array,
                     start: jax.Array) -> jax.Array:
    """One query per row at slot `index` (its key already written). q: (B, 1, H, D); caches (B, K, S, D).

    Dense over all S slots (masked): two matmuls batched over (B, K) that read the cache once, in place.
    """
    batch, _, heads, dim = q.shape
    kv_heads, slots = key_cache.shape[1], key_cache.shape[2]
    qg = q.reshape(batch, kv_heads, heads // kv_heads, dim).astype(key_cache.dtype)
    scores = jnp.einsum("bkgd,bksd->bkgs", qg, key_cache, preferred_element_type=jnp.float32) * dim ** -0.5
    visible = _visible(index[None], jnp.arange(slots), start)[:, :, None, :]  # (B, 1, 1, S)
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bkgs,bksd->bkgd", probs.astype(value_cache.dtype), value_cache,
                     preferred_element_type=jnp.float32)
    return out.reshape(batch, 1, heads, dim).astype(q.dtype)


def blockwise_cache_attention(q: jax.Array, key_cache: jax.Array, value_cache: jax.Array, query_slots: jax.Array,
                              start: jax.Array, block: int = CACHE_BLOCK) -> jax.Array:
    """A chunk of T queries at slots query_slots (T,) over the cache, with an online softmax over key blocks.

    Only the blocks up to the last query slot are visited (a `fori_loop` with a traced bound), so a chunk late in
    a long prompt costs its share of the context and memory stays (B, H, T, block) whatever S is.
    q: (B, T, H, D); caches (B, K, S, D); start (B,). Returns (B, T, H, D) in q.dtype.
    """
    batch, length, heads, dim = q.shape
    kv_heads, slots = key_cache.shape[1], key_cache.shape[2]
    groups = heads // kv_heads
    block = min(block, slots)
    qg = q.reshape(batch, length, kv_heads, groups, dim).astype(key_cache.dtype)
    num_blocks = (query_slots[-1] + block) // block  # blocks holding slots 0 .. last query slot

    def visit(b, carry):
        running_max, running_sum, acc = carry
        first = b * block
        offset = jnp.minimum(first, slots - block)  # the last block is shifted back to stay inside the cache
        keys = jax.lax.dynamic_slice_in_dim(key_cache, offset, block, axis=2)
        values = jax.lax.dynamic_slice_in_dim(value_cache, offset, block, axis=2)
        scores = jnp.einsum("btkgd,bksd->bkgts", qg, keys, preferred_element_type=jnp.float32) * dim ** -0.5
        key_slots = offset + jnp.arange(block)
        visible = _visible(query_slots, key_slots, start) & (key_slots >= first)[None, None]  # no slot twice
        visible = visible[:, None, None]  # (B, 1, 1, T, block)
        block_max = jnp.max(jnp.where(visible, scores, -jnp.inf), axis=-1)
        new_max = jnp.maximum(running_max, block_max)
        probs = jnp.where(visible, jnp.exp(scores - new_max[..., None]), 0.0)
        rescale = jnp.exp(running_max - new_max)
        pv = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(values.dtype), values, preferred_element_type=jnp.float32)
        return new_max, rescale * running_sum + probs.sum(-1), rescale[..., None] * acc + pv

    init = (jnp.full((batch, kv_heads, groups, length), -1e30, jnp.float32),
            jnp.zeros((batch, kv_heads, groups, length), jnp.float32),
            jnp.zeros((batch, kv_heads, groups, length, dim), jnp.float32))
    _, total, acc = jax.lax.fori_loop(0, num_blocks, visit, init)
    out = acc / total[..., None]  # every query sees at least its own slot: total > 0
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, dim).astype(q.dtype)


def cached_attention(q, k, v, cache: dict, index: jax.Array, start: jax.Array):
    """Write this step's keys/values at slots index .. index+T-1, then attend over the cache.

    q: (B, T, H, D); k, v: (B, T, K, D); cache {"key", "value"}: (B, K, S, D). Returns (out, new cache).
    A first chunk of an unpadded batch (index 0, every start 0) needs nothing from the cache and takes the causal
    path (cuDNN flash attention on GPU); one token takes `decode_attention`; other chunks the blockwise path.
    """
    length = q.shape[1]
    write = lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, x.transpose(0, 2, 1, 3).astype(c.dtype), index,
                                                             axis=2)
    # The barrier keeps each update one in-place write that attention and the returned cache share; without it XLA
    # may fuse the write into both users and copy the whole cache for each of them on every step.
    key_cache, value_cache = jax.lax.optimization_barrier((write(cache["key"], k), write(cache["value"], v)))
    if length == 1:
        out = decode_attention(q, key_cache, value_cache, index, start)
    else:
        query_slots = index + jnp.arange(length, dtype=jnp.int32)
        out = jax.lax.cond(
            (index == 0) & jnp.all(start == 0),
            lambda: causal_attention(q, k.astype(key_cache.dtype), v.astype(value_cache.dtype)).astype(q.dtype),
            lambda: blockwise_cache_attention(q, key_cache, value_cache, query_slots, start))
    return out, {"key": key_cache, "value": value_cache}


class SoftmaxAttention(nn.Module):
    """x: (B, T, hidden) -> ((B, T, hidden), new cache or None). Parameters q_proj, k_proj, v_proj, o_proj.

    Without a cache: causal attention over x (segment_ids separate packed documents). With a cache
    {"key", "value"}: (B, K, S, D) and cache_slots = (index () int32, start (B,) int32): see `cached_attention`.
    """

    config: M1Config

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
                 cache: dict | None = None, cache_slots: tuple[jax.Array, jax.Array] | None = None):
        cfg = self.config
        batch, length, _ = x.shape
        heads, kv_heads, dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = projection(cfg, heads * dim, "q_proj")(x).reshape(batch, length, heads, dim)
        k = projection(cfg, kv_heads * dim, "k_proj")(x).reshape(batch, length, kv_heads, dim)
        v = projection(cfg, kv_heads * dim, "v_proj")(x).reshape(batch, length, kv_heads, dim)
        q = apply_rope(q, positions, cfg.rotary_dim, cfg.rope_theta)
        k = apply_rope(k, positions, cfg.rotary_dim, cfg.rope_theta)
        if cache is None:
            out, new_cache = causal_attention(q, k, v, segment_ids), None
        else:
            out, new_cache = cached_attention(q, k, v, cache, *cache_slots)
        return projection(cfg, cfg.hidden_size, "o_proj")(out.reshape(batch, length, heads * dim)), new_cache
