"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, statistics in float32 (as the released code and transformers)."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from m1jax.layers.partitioning import Module, named


class RMSNorm(Module):
    """Normalises the last axis. x: (..., C) -> (..., C) in x.dtype; parameter `scale` (C,)."""

    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", named(nn.initializers.ones, "norm"), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * normed.astype(x.dtype)
