"""Short causal depthwise convolution over time (a research option of the lightning layer; M1 has none).

    out_t = sum_{j=0}^{W-1} kernel[W-1-j] * x_{t-j}      per channel c; kernel[W-1] weighs the token itself

A term is zero when t-j < 0 or, with segment_ids, when token t-j lies in another segment than token t (packed
documents never mix). The linear-attention models of Zoology, Based and flash-linear-attention put such a convolution
(W ~ 4) before their feature maps: it gives each token a feature of the previous few, e.g. the previous-token
feature associative recall needs. W is small, so the sum is W shifted copies of x, computed in x's dtype.

Shapes: x (B, T, C), kernel (W, C), segment_ids (B, T) int or None -> (B, T, C).
"""
import jax
import jax.numpy as jnp


def causal_short_conv(x: jax.Array, kernel: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """x: (B, T, C), kernel: (W, C), segment_ids: (B, T) or None -> (B, T, C) in x's dtype (formula above)."""
    width, length = kernel.shape[0], x.shape[1]
    kernel = kernel.astype(x.dtype)
    out = kernel[width - 1] * x
    for j in range(1, min(width, length)):
        shifted = jnp.pad(x[:, :-j], ((0, 0), (j, 0), (0, 0)))  # shifted[:, t] = x[:, t - j], zero for t < j
        if segment_ids is not None:
            same = jnp.pad(segment_ids[:, :-j] == segment_ids[:, j:], ((0, 0), (j, 0)))
            shifted = jnp.where(same[..., None], shifted, 0)
        out = out + kernel[width - 1 - j] * shifted
    return out


def identity_kernel(key: jax.Array, shape: tuple[int, int], dtype=jnp.float32) -> jax.Array:
    """The (W, C) initialiser that makes the convolution the identity: kernel[W-1] = 1, the rest 0 (key unused)."""
    del key
    return jnp.zeros(shape, dtype).at[-1].set(1)
