"""Softmax attention layer of M1: grouped-query attention with partial RoPE, no biases, no qk-norm, scale 1/sqrt(D).

On GPU with bf16/fp16 activations and no packing mask it runs cuDNN's flash attention through
`jax.nn.dot_product_attention(implementation="cudnn")`; elsewhere XLA's implementation.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from m1jax.config import M1Config
from m1jax.layers.projection import projection
from m1jax.layers.rope import apply_rope


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


class SoftmaxAttention(nn.Module):
    """x: (B, T, hidden) -> (B, T, hidden). Parameters q_proj, k_proj, v_proj, o_proj (no biases)."""

    config: M1Config

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        batch, length, _ = x.shape
        heads, kv_heads, dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = projection(cfg, heads * dim, "q_proj")(x).reshape(batch, length, heads, dim)
        k = projection(cfg, kv_heads * dim, "k_proj")(x).reshape(batch, length, kv_heads, dim)
        v = projection(cfg, kv_heads * dim, "v_proj")(x).reshape(batch, length, kv_heads, dim)
        q = apply_rope(q, positions, cfg.rotary_dim, cfg.rope_theta)
        k = apply_rope(k, positions, cfg.rotary_dim, cfg.rope_theta)
        out = causal_attention(q, k, v, segment_ids)
        return projection(cfg, cfg.hidden_size, "o_proj")(out.reshape(batch, length, heads * dim))

