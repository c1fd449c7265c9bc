"""Partial rotary position embedding, rotate-half (NeoX) pairing, as in the released MiniMax-M1 code.

Only the first `rotary_dim` of each head's D dims rotate (64 of 128 in M1): dim i pairs with i + rotary_dim/2, with
frequencies theta^(-2i/rotary_dim); the remaining D - rotary_dim dims pass through unchanged.
"""
import jax
import jax.numpy as jnp


def rope_inverse_frequencies(rotary_dim: int, theta: float) -> jax.Array:
    """(rotary_dim/2,) float32: 1 / theta^(2i / rotary_dim)."""
    exponent = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
    return 1.0 / (jnp.float32(theta) ** exponent)


def apply_rope(x: jax.Array, positions: jax.Array, rotary_dim: int, theta: float) -> jax.Array:
    """x: (B, T, N, D) queries or keys; positions: (B, T) integer token positions. Returns (B, T, N, D) in x.dtype."""
    freqs = positions[..., None].astype(jnp.float32) * rope_inverse_frequencies(rotary_dim, theta)  # (B, T, r/2)
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # (B, T, 1, r)
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    rotary, passthrough = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = jnp.split(rotary, 2, axis=-1)
    rotated_half = jnp.concatenate([-second, first], axis=-1)
    return jnp.concatenate([rotary * cos + rotated_half * sin, passthrough], axis=-1)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """(B, T) positions that restart at 0 wherever the segment id changes (packed documents)."""
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return index - start_index
