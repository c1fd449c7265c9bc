"""Fused one-token lightning attention step (Pallas, Triton backend) for the inference engine.

One program owns one (sequence, head, tile of BV state columns): it reads that (D, BV) tile of the
float32 state once, forms exp(-s) S + k^T v in registers, writes it back and reduces q @ S for its
BV outputs. The state buffer is aliased to the new state, so under `jit` with a donated state the
update happens in place. Memory-bound: each state byte is read once and written once.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

DECODE_BLOCK_V = 128  # whole state rows per program: fastest of 32/64/128 on an H200 (notes_lightning.md)
DECODE_NUM_WARPS = 8


def _decode_kernel(slope_ref, q_ref, k_ref, v_ref, state_ref, o_ref, new_state_ref):
    decay = jnp.exp(-slope_ref[...].astype(jnp.float32))  # (1,)
    q = q_ref[...].astype(jnp.float32)  # (D,)
    k = k_ref[...].astype(jnp.float32)  # (D,)
    v = v_ref[...].astype(jnp.float32)  # (BV,)
    state = decay * state_ref[...] + k[:, None] * v[None, :]  # (D, BV)
    new_state_ref[...] = state
    o_ref[...] = jnp.sum(q[:, None] * state, axis=0).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_v", "num_warps", "interpret"))
def pallas_lightning_decode(q, k, v, slopes, state, *, block_v=DECODE_BLOCK_V, num_warps=DECODE_NUM_WARPS,
                            interpret=False):
    """q, k, v: (B, H, D); slopes (H,); state (B, H, D, D) float32. Returns (o (B, H, D) in q.dtype, new state)."""
    batch, heads, head_dim = q.shape
    block_v = min(block_v, head_dim)
    vector = pl.BlockSpec((None, None, head_dim), lambda b, h, j: (b, h, 0))
    column_tile = pl.BlockSpec((None, None, block_v), lambda b, h, j: (b, h, j))
    state_tile = pl.BlockSpec((None, None, head_dim, block_v), lambda b, h, j: (b, h, 0, j))
    return pl.pallas_call(
        _decode_kernel,
        grid=(batch, heads, head_dim // block_v),
        in_specs=[pl.BlockSpec((1,), lambda b, h, j: (h,)), vector, vector, column_tile, state_tile],
        out_specs=[column_tile, state_tile],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(state.shape, jnp.float32)],
        input_output_aliases={4: 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="lightning_decode",
    )(slopes.astype(jnp.float32), q, k, v, state.astype(jnp.float32))
