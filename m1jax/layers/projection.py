"""The bias-free linear projections every M1 layer uses, in the run policy's compute and parameter dtypes."""
import flax.linen as nn
import jax.numpy as jnp

from m1jax.config import M1Config, RunPolicy
from m1jax.layers.partitioning import named


def projection(cfg: M1Config, policy: RunPolicy, features: int, name: str, axes: tuple[str, str]) -> nn.Dense:
    """x @ kernel with kernel (in, features) ~ N(0, initializer_range), its dims named `axes` (logical names, e.g.
    ("embed", "heads")); HF stores the transpose (features, in)."""
    return nn.Dense(features, use_bias=False, dtype=jnp.dtype(policy.compute_dtype),
                    param_dtype=jnp.dtype(policy.param_dtype),
                    kernel_init=named(nn.initializers.normal(cfg.initializer_range), *axes), name=name)
