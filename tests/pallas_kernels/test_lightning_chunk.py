"""The chunk-parallel forward kernels (interpret mode on the CPU) against the time recurrence.

Small blocks (16) keep interpret mode fast. Lengths cover one token, a block minus/plus one, a chunk
plus a remainder and several chunks with a ragged last one; chunks of 1, 2 and 3 blocks; several
state tiles and output-column tiles per head; packed rows with uneven (sometimes one-token) segments
and an initial state. Gradients go through the backward sweeps (custom VJP) after a chunk forward.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lightning_attention.chunk_kernel import ChunkConfig
from pallas_kernels.lightning_attention.pallas_attention import (CHUNK_FORWARD_MAX_TOKENS, choose_forward_config,
                                                                 pallas_lightning_attention)
from pallas_kernels.lightning_attention.reference import reference_lightning_attention
from pallas_kernels.lightning_attention.sweep_kernel import SweepConfig

BLOCK = 16


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def random_case(seed, batch, num_tokens, heads, head_dim, dtype, packed, with_state=True):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    q, k, v = (jax.random.normal(keys[i], (batch, num_tokens, heads, head_dim), jnp.float32).astype(dtype)
               for i in range(3))
    slopes = jax.random.uniform(keys[3], (heads,), jnp.float32, 0.01, 1.0)
    state0 = jax.random.normal(keys[4], (batch, heads, head_dim, head_dim), jnp.float32) if with_state else None
    segment_ids = None
    if packed:  # uneven segments, some a single token; ids need not increase
        starts = jax.random.bernoulli(keys[5], 0.1, (batch, num_tokens))
        segment_ids = (jnp.cumsum(starts, axis=1) % 3).astype(jnp.int32)
    return q, k, v, slopes, state0, segment_ids


def check_forward(case, config, tol):
    q, k, v, slopes, state0, segment_ids = case
    run = jax.jit(lambda q, k, v, s0: pallas_lightning_attention(
        q, k, v, slopes, initial_state=s0, segment_ids=segment_ids, config=config, interpret=True))
    o, final = run(q, k, v, state0)
    want_o, want_final = reference_lightning_attention(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), slopes, initial_state=state0,
        segment_ids=segment_ids)
    assert o.shape == q.shape and o.dtype == q.dtype and final.dtype == jnp.float32
    assert rel_err(o, want_o) < tol, rel_err(o, want_o)
    assert rel_err(final, want_final) < tol, rel_err(final, want_final)


@pytest.mark.parametrize("num_tokens,chunk_blocks", [
    (1, 2), (BLOCK - 1, 4), (BLOCK + 1, 2), (2 * BLOCK, 2), (2 * BLOCK + 5, 4), (3 * BLOCK + 5, 2),
    (7 * BLOCK + 3, 4)])
def test_chunk_forward_float32_packed_with_initial_state(num_tokens, chunk_blocks):
    config = ChunkConfig(block=BLOCK, chunk_blocks=chunk_blocks, state_tile=16, block_v=16)
    check_forward(random_case(num_tokens, 2, num_tokens, 2, 32, jnp.float32, packed=True), config, tol=1e-4)


def test_chunk_length_is_a_power_of_two_blocks_at_every_row_length():
    # The chunk is a tile dimension of the states kernel: Triton on the GPU refuses a non power-of-two tile
    # (a 154-token row once made a (192, 32) tile; interpret mode does not check this, so it is checked here).
    for config in (ChunkConfig(), choose_forward_config((1, 154, 4, 64), jnp.float32), ChunkConfig(chunk_blocks=8)):
        for num_tokens in range(1, 40 * config.block):
            blocks = config.chunk_len(num_tokens) // config.block
            assert config.chunk_len(num_tokens) % config.block == 0 and blocks & (blocks - 1) == 0, num_tokens
            assert blocks <= config.chunk_blocks
    with pytest.raises(ValueError, match="chunk_blocks must be a power of two"):
        ChunkConfig(chunk_blocks=3)


@pytest.mark.parametrize("chunk_blocks,state_tile,block_v", [(1, 8, 32), (4, 32, 16)])
def test_chunk_forward_float32_unpacked_tilings(chunk_blocks, state_tile, block_v):
    config = ChunkConfig(block=BLOCK, chunk_blocks=chunk_blocks, state_tile=state_tile, block_v=block_v)
    case = random_case(3 + chunk_blocks, 1, 5 * BLOCK + 9, 3, 32, jnp.float32, packed=False,
                       with_state=chunk_blocks == 1)
    check_forward(case, config, tol=1e-4)


def test_chunk_forward_bfloat16_packed():
    config = ChunkConfig(block=BLOCK, chunk_blocks=2, state_tile=16, block_v=16)
    check_forward(random_case(5, 2, 4 * BLOCK + 7, 2, 32, jnp.bfloat16, packed=True), config, tol=1e-2)


def test_chunk_forward_model_head_dim_default_tiling():
    """D = 128 with the shipped bf16 tiling (64-token blocks, 128-token chunks) on a ragged length."""
    config = choose_forward_config((1, 300, 1, 128), jnp.bfloat16)
    assert isinstance(config, ChunkConfig)
    check_forward(random_case(11, 1, 300, 1, 128, jnp.bfloat16, packed=True), config, tol=1e-2)


def test_chunk_forward_then_sweep_backward_gradients():
    """Gradients of o and the final state wrt q, k, v and the initial state after a chunk forward."""
    q, k, v, slopes, state0, segment_ids = random_case(17, 2, 3 * BLOCK + 2, 2, 16, jnp.float32, packed=True)
    keys = jax.random.split(jax.random.PRNGKey(18), 2)
    do = jax.random.normal(keys[0], q.shape, jnp.float32)
    dfinal = jax.random.normal(keys[1], state0.shape, jnp.float32)
    chunk = ChunkConfig(block=BLOCK, chunk_blocks=2, state_tile=8, block_v=16)
    backward = SweepConfig(block=BLOCK, block_v=16, min_span_blocks=1)

    def grads(attention):
        def loss(q, k, v, s0):
            o, final = attention(q, k, v, s0)
            return jnp.sum(o * do) + jnp.sum(final * dfinal)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, state0)

    got = grads(lambda q, k, v, s0: pallas_lightning_attention(
        q, k, v, slopes, initial_state=s0, segment_ids=segment_ids, config=chunk, backward_config=backward,
        interpret=True))
    want = grads(lambda q, k, v, s0: reference_lightning_attention(q, k, v, slopes, initial_state=s0,
                                                                   segment_ids=segment_ids))
    for name, g, w in zip(("dq", "dk", "dv", "dstate0"), got, want):
        assert rel_err(g, w) < 1e-4, (name, rel_err(g, w))


def test_chunk_forward_large_slopes_stay_finite():
    """Decays are built from non-negative exponents only: steep slopes underflow to zero, never overflow."""
    q, k, v, _, state0, _ = random_case(23, 1, 4 * BLOCK, 2, 16, jnp.float32, packed=False)
    slopes = jnp.array([3.0, 40.0], jnp.float32)
    config = ChunkConfig(block=BLOCK, chunk_blocks=4, state_tile=16, block_v=16)
    o, final = pallas_lightning_attention(q, k, v, slopes, initial_state=state0, config=config, interpret=True)
    want_o, want_final = reference_lightning_attention(q, k, v, slopes, initial_state=state0)
    assert np.isfinite(np.asarray(o)).all() and np.isfinite(np.asarray(final)).all()
    assert rel_err(o, want_o) < 1e-4 and rel_err(final, want_final) < 1e-4


def test_forward_rule_chunks_short_rows_and_sweeps_long_ones():
    """The measured dispatch: chunk-parallel up to CHUNK_FORWARD_MAX_TOKENS per row, the sweep beyond;
    float32 gets smaller chunk tiles; a block size passes through to either."""
    short, long = (8, CHUNK_FORWARD_MAX_TOKENS, 8, 128), (1, CHUNK_FORWARD_MAX_TOKENS + 1, 64, 128)
    assert choose_forward_config(short, jnp.bfloat16) == ChunkConfig()
    f32 = choose_forward_config(short, jnp.float32)
    assert isinstance(f32, ChunkConfig) and f32.block_v < ChunkConfig().block_v
    assert choose_forward_config(long, jnp.bfloat16) == SweepConfig()
    assert choose_forward_config(short, jnp.bfloat16, block=32).block == 32
    assert choose_forward_config(long, jnp.float32, block=32) == SweepConfig(block=32)
