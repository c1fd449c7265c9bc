"""M1's decoder layer: attention (lightning or softmax) then MoE, each with DeepNorm post-norm residuals.

    y = input_norm(h);     h = alpha_attn * y + beta_attn * Attention(y)
    y = post_attn_norm(h); h = alpha_mlp * y + beta_mlp * MoE(y)
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from m1jax.config import LIGHTNING, M1Config
from m1jax.layers.lightning_attention import LightningAttention
from m1jax.layers.moe import MoE, GroupedMatmul
from m1jax.layers.norms import RMSNorm
from m1jax.layers.softmax_attention import SoftmaxAttention


class DecoderLayer(nn.Module):
    """h: (B, T, hidden) -> (h', routing statistics). `kind` is "lightning" or "softmax"."""

    config: M1Config
    kind: str
    grouped_matmul: GroupedMatmul | None = None

    @nn.compact
    def __call__(self, h: jax.Array, layer_index: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None = None):
        cfg = self.config
        pdtype = jnp.dtype(cfg.param_dtype)
        alpha, beta = cfg.residual_scales(self.kind)
        y = RMSNorm(cfg.rms_norm_eps, pdtype, name="input_norm")(h)
        if self.kind == LIGHTNING:
            attn, _ = LightningAttention(cfg, name="attn")(y, layer_index, segment_ids)
        else:
            attn = SoftmaxAttention(cfg, name="attn")(y, positions, segment_ids)
        h = alpha * y + beta * attn
        y = RMSNorm(cfg.rms_norm_eps, pdtype, name="post_attn_norm")(h)
        token_mask = None if segment_ids is None else segment_ids != 0
        moe_out, stats = MoE(cfg, self.grouped_matmul, name="moe")(y, token_mask)
        return cfg.mlp_alpha * y + cfg.mlp_beta * moe_out, stats
