"""Lightning attention layer of M1 (linear attention with per-head exponential decay).

    qkv = silu(conv(x @ qkv_proj)), split per head as [q | k | v]  (reshape to (B, T, H, 3D), split the last axis)
    o_i = sum_{t <= i} exp(-s_h (i - t)) (q_i . k_t) v_t      no 1/sqrt(D) scale, no normaliser
    out = out_proj(RMSNorm_{H*D}(o) * sigmoid(x @ output_gate))

The slopes s_h come from the global layer index (`M1Config.lightning_slopes`); the op (blocked form, Pallas kernel
on GPU) lives in `pallas_kernels.lightning_attention`. The RMSNorm spans all H*D channels with eps 1e-6.

conv is the identity in M1. With `M1Config.lightning_short_conv` = W > 0 (a research option) it is a causal
depthwise convolution of width W over the 3*H*D channels within each packed document (`m1jax.layers.short_conv`),
its kernel "short_conv" (W, 3*H*D) initialised to the identity; training only, as decoding would need the last W-1
inputs cached.

Inference carries the (B, H, D, D) float32 state from call to call: a prompt chunk starts from it
(`initial_state`), one token takes the recurrent step `lightning_decode`. Padding tokens (token_mask 0) get zero
q, k, v, as in transformers: a state stays exactly zero through a row's leading padding.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from m1jax.config import LIGHTNING_NORM_EPS, M1Config, RunPolicy
from m1jax.layers.norms import RMSNorm
from m1jax.layers.partitioning import Module, named
from m1jax.layers.projection import projection
from m1jax.layers.short_conv import causal_short_conv, identity_kernel
from pallas_kernels.lightning_attention import lightning_attention, lightning_decode


class LightningAttention(Module):
    """x: (B, T, hidden), layer_index: () int (global), segment_ids: (B, T) or None, state: (B, H, D, D) float32 or
    None, token_mask: (B, T) bool or None (False: padding) -> ((B, T, hidden), final state (B, H, D, D) float32).
    Parameters qkv_proj, output_gate, norm, out_proj (and short_conv (W, 3*H*D) when lightning_short_conv = W > 0).
    With a state and T = 1 the recurrent decode step runs."""

    config: M1Config
    policy: RunPolicy = RunPolicy()

    @nn.compact
    def __call__(self, x: jax.Array, layer_index: jax.Array, segment_ids: jax.Array | None = None,
                 state: jax.Array | None = None, token_mask: jax.Array | None = None):
        cfg, policy = self.config, self.policy
        batch, length, _ = x.shape
        heads, dim = cfg.num_heads, cfg.head_dim
        qkv = projection(cfg, policy, 3 * heads * dim, "qkv_proj", ("embed", "heads"))(x)
        mask = None if token_mask is None else token_mask[..., None].astype(qkv.dtype)
        if cfg.lightning_short_conv:
            if state is not None:
                raise ValueError(f"M1Config.lightning_short_conv={cfg.lightning_short_conv} is training-only: "
                                 "decoding or chunked prefill would need the last W-1 inputs cached; run inference "
                                 "with a model whose lightning_short_conv is 0")
            kernel = self.param("short_conv", named(identity_kernel, None, "heads"),
                                (cfg.lightning_short_conv, 3 * heads * dim), jnp.dtype(policy.param_dtype))
            qkv = causal_short_conv(qkv if mask is None else qkv * mask, kernel, segment_ids)  # padding adds nothing
        qkv = jax.nn.silu(qkv)
        if mask is not None:
            qkv = qkv * mask
        q, k, v = jnp.split(qkv.reshape(batch, length, heads, 3 * dim), 3, axis=-1)
        slopes = jnp.asarray(cfg.lightning_slopes())[layer_index]
        with jax.named_scope("lightning_attention"):
            if state is not None and length == 1:
                out, final_state = lightning_decode(q[:, 0], k[:, 0], v[:, 0], slopes, state)
                out = out[:, None]
            else:
                out, final_state = lightning_attention(q, k, v, slopes, initial_state=state,
                                                       return_final_state=True, segment_ids=segment_ids,
                                                       block_size=policy.block_size)
        out = RMSNorm(LIGHTNING_NORM_EPS, jnp.dtype(policy.param_dtype), name="norm")(
            out.reshape(batch, length, heads * dim))
        out = jax.nn.sigmoid(projection(cfg, policy, heads * dim, "output_gate", ("embed", "heads"))(x)) * out
        return projection(cfg, policy, cfg.hidden_size, "out_proj", ("heads", "embed"))(out), final_state
