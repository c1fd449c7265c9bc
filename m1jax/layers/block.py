"""M1's decoder layer: attention (lightning or softmax) then MoE, each with DeepNorm post-norm residuals.

    y = input_norm(h);     h = alpha_attn * y + beta_attn * Attention(y)
    y = post_attn_norm(h); h = alpha_mlp * y + beta_mlp * MoE(y)
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from m1jax.config import LIGHTNING, M1Config, RunPolicy
from m1jax.layers.lightning_attention import LightningAttention
from m1jax.layers.moe import MoE
from m1jax.layers.moe_core import GroupedMatmul
from m1jax.layers.norms import RMSNorm
from m1jax.layers.partitioning import Module
from m1jax.layers.softmax_attention import SoftmaxAttention


class DecoderLayer(Module):
    """h: (B, T, hidden) -> (h', routing statistics, new cache). `kind` is "lightning" or "softmax".

    Without a cache, segment_ids marks packed documents (0: padding) and the new cache is None. With one (a layer's
    entry: {"state"} for lightning, {"key", "value"} for softmax; cache_slots = (index, start, fresh) of
    m1jax.inference.Cache), segment_ids is the token mask (0: padding) and the layer returns its updated entry.
    """

    config: M1Config
    kind: str
    policy: RunPolicy = RunPolicy()
    grouped_matmul: GroupedMatmul | None = None
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None  # the MoE's expert-parallel mesh

    @nn.compact
    def __call__(self, h: jax.Array, layer_index: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None = None, cache: dict | None = None,
                 cache_slots: tuple[jax.Array, jax.Array, bool] | None = None):
        cfg, policy = self.config, self.policy
        pdtype = jnp.dtype(policy.param_dtype)
        alpha, beta = cfg.residual_scales(self.kind)
        token_mask = None if segment_ids is None else segment_ids != 0
        y = RMSNorm(cfg.rms_norm_eps, pdtype, name="input_norm")(h)
        if self.kind == LIGHTNING and cache is None:
            attn, new_cache = LightningAttention(cfg, policy, name="attn")(y, layer_index, segment_ids)[0], None
        elif self.kind == LIGHTNING:
            attn, state = LightningAttention(cfg, policy, name="attn")(y, layer_index, state=cache["state"],
                                                               token_mask=token_mask)
            new_cache = {"state": state}
        else:
            attn, new_cache = SoftmaxAttention(cfg, policy, name="attn")(y, positions, segment_ids, cache, cache_slots)
        h = alpha * y + beta * attn
        y = RMSNorm(cfg.rms_norm_eps, pdtype, name="post_attn_norm")(h)
        moe_out, stats = MoE(cfg, self.grouped_matmul, self.mesh, policy, name="moe")(y, token_mask)
        return cfg.mlp_alpha * y + cfg.mlp_beta * moe_out, stats, new_cache
