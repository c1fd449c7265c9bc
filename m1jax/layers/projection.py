"""The bias-free linear projections every M1 layer uses, in the run policy's compute and parameter dtypes.

A product of ONE row (batch-1 decode: x (1, 1, in)) runs as a product of two, the second row zero. XLA's GPU
simplifier rewrites a vector x matrix dot with a small matrix (its source's threshold: 10M elements) into an
element-wise multiply and a reduction; at hf-bench's 1024 x 3072 qkv projection that read the weights at ~0.7 TB/s on
an H200, where the 1024 x 32,000 lm_head, still a GEMM, read at ~3.3 TB/s. Two rows keep the dot a GEMM: hf-bench
batch-1 decode 0.482 -> 0.435 ms/token (benchmarks/decode_flags.py --rounds 3 --steps 256, variant projection-one-row
the old path; RESULTS.md "Decode at batch 1"). The result is the same product (the zero row is dropped); only the
order of the float32 sums may differ from the reduction's.
"""
import math

import flax.linen as nn
import jax.numpy as jnp

from m1jax.config import M1Config, RunPolicy
from m1jax.layers.partitioning import named


class Projection(nn.Dense):
    """nn.Dense (x @ kernel, kernel (in, features)) that runs a single row as two rows: see the module docstring."""

    def __call__(self, inputs):
        if math.prod(inputs.shape[:-1]) != 1:
            return super().__call__(inputs)
        row = inputs.reshape(1, inputs.shape[-1])
        out = super().__call__(jnp.concatenate([row, jnp.zeros_like(row)]))[:1]
        return out.reshape(*inputs.shape[:-1], self.features)


def projection(cfg: M1Config, policy: RunPolicy, features: int, name: str, axes: tuple[str, str]) -> nn.Dense:
    """x @ kernel with kernel (in, features) ~ N(0, initializer_range), its dims named `axes` (logical names, e.g.
    ("embed", "heads")); HF stores the transpose (features, in)."""
    return Projection(features, use_bias=False, dtype=jnp.dtype(policy.compute_dtype),
                      param_dtype=jnp.dtype(policy.param_dtype),
                      kernel_init=named(nn.initializers.normal(cfg.initializer_range), *axes), name=name)
