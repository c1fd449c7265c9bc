"""The Pallas kernels (interpret mode on the CPU) against the time recurrence.

Small blocks (16) and head dims (16, 32) keep interpret mode fast; lengths cover one token, a block
minus/plus one and several blocks with a remainder. Rows are cut into one-block spans by default
(the most sequence-parallel layout); other tests use uneven spans and a single span. The real
head dims 64 and 128 run at tiny T.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lightning_attention import lightning_attention, lightning_decode
from pallas_kernels.lightning_attention.pallas_attention import pallas_lightning_attention
from pallas_kernels.lightning_attention.reference import reference_lightning_attention
from pallas_kernels.lightning_attention.sweep_kernel import SweepConfig

BLOCK = 16
CONFIG = SweepConfig(block=BLOCK, block_v=16, min_span_blocks=1)


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def random_case(seed, batch, num_tokens, heads, head_dim, dtype, packed):
    keys = jax.random.split(jax.random.PRNGKey(seed), 8)
    q, k, v = (jax.random.normal(keys[i], (batch, num_tokens, heads, head_dim), jnp.float32).astype(dtype)
               for i in range(3))
    slopes = jax.random.uniform(keys[3], (heads,), jnp.float32, 0.01, 1.0)
    state0 = jax.random.normal(keys[4], (batch, heads, head_dim, head_dim), jnp.float32)
    segment_ids = None
    if packed:  # uneven segments, one of them maybe a single token; ids need not increase
        starts = jax.random.bernoulli(keys[5], 0.12, (batch, num_tokens))
        segment_ids = (jnp.cumsum(starts, axis=1) % 2).astype(jnp.int32)
    do = jax.random.normal(keys[6], (batch, num_tokens, heads, head_dim), jnp.float32)
    dfinal = jax.random.normal(keys[7], state0.shape, jnp.float32)
    return q, k, v, slopes, state0, segment_ids, do, dfinal


def value_and_grads(attention, argnums, q, k, v, slopes, state0, do, dfinal):
    def loss(q, k, v, slopes, state0):
        o, final = attention(q, k, v, slopes, state0)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(final * dfinal), (o, final)
    (_, (o, final)), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(q, k, v, slopes, state0)
    return o, final, grads


def compare(case, tol, config=CONFIG, with_slopes=False):
    """Output, final state and the gradients wrt q, k, v, the initial state (and the slopes)."""
    q, k, v, slopes, state0, segment_ids, do, dfinal = case
    pallas = lambda q, k, v, s, s0: pallas_lightning_attention(q, k, v, s, initial_state=s0, segment_ids=segment_ids,
                                                               config=config, interpret=True)
    reference = lambda q, k, v, s, s0: reference_lightning_attention(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), s, initial_state=s0,
        segment_ids=segment_ids)
    argnums = (0, 1, 2, 4, 3) if with_slopes else (0, 1, 2, 4)
    run = jax.jit(value_and_grads, static_argnums=(0, 1))
    got = run(pallas, argnums, q, k, v, slopes, state0, do, dfinal)
    want = run(reference, argnums, q, k, v, slopes, state0, do, dfinal)
    assert got[0].dtype == q.dtype and got[1].dtype == jnp.float32
    names = ("o", "final state", "dq", "dk", "dv", "dstate0", "dslopes")
    for name, g, w in zip(names, got[:2] + tuple(got[2]), want[:2] + tuple(want[2])):
        assert rel_err(g, w) < tol, (name, rel_err(g, w))


@pytest.mark.parametrize("num_tokens", [1, BLOCK - 1, BLOCK + 1, 3 * BLOCK + 5])
def test_pallas_float32_packed_with_initial_state(num_tokens):
    # The slope gradient (taken through the chunked path) sums large terms of both signs; it is checked
    # in float32 only: rounding a bf16 output's cotangent to bf16 alone moves it by a few percent.
    compare(random_case(num_tokens, 2, num_tokens, 2, 16, jnp.float32, packed=True), tol=1e-4,
            with_slopes=num_tokens > BLOCK)


@pytest.mark.parametrize("num_tokens,heads,head_dim", [(2 * BLOCK, 3, 32), (2 * BLOCK + 7, 1, 16)])
def test_pallas_float32_unpacked(num_tokens, heads, head_dim):
    compare(random_case(7 + num_tokens, 1, num_tokens, heads, head_dim, jnp.float32, packed=False), tol=1e-4)


def test_pallas_bfloat16_packed():
    compare(random_case(3, 2, 2 * BLOCK + 5, 2, 32, jnp.bfloat16, packed=True), tol=1e-2)


def test_pallas_column_tiles_and_long_blocks():
    """Several output-column tiles per head (block_v < D) and a block longer than T."""
    case = random_case(5, 1, 21, 2, 32, jnp.float32, packed=True)
    compare(case, tol=1e-4, config=SweepConfig(block=32, block_v=16))


@pytest.mark.parametrize("config", [
    SweepConfig(block=BLOCK, block_v=16, min_span_blocks=2),  # spans of 2, 2 and 1 blocks
    SweepConfig(block=BLOCK, block_v=16, target_programs=0),  # one span per row
])
def test_pallas_span_layouts(config):
    case = random_case(9, 1, 4 * BLOCK + 3, 2, 16, jnp.float32, packed=True)
    compare(case, tol=1e-4, config=config)


def test_pallas_separate_backward_tiling():
    q, k, v, slopes, state0, segment_ids, do, dfinal = random_case(13, 1, 3 * BLOCK + 2, 2, 32, jnp.float32, True)
    attention = lambda config, backward: lambda q, k, v: pallas_lightning_attention(
        q, k, v, slopes, initial_state=state0, segment_ids=segment_ids, config=config, backward_config=backward,
        interpret=True)
    same = attention(CONFIG, CONFIG)
    other = attention(CONFIG, SweepConfig(block=32, block_v=32, target_programs=0))
    run = jax.jit(lambda f, *args: (f(*args), jax.vjp(f, *args)[1]((do, dfinal))), static_argnums=0)
    (o, final), grads = run(same, q, k, v)
    (o2, final2), grads2 = run(other, q, k, v)
    assert rel_err(o2, o) < 1e-6 and rel_err(final2, final) < 1e-6
    for g, g2 in zip(grads, grads2):
        assert rel_err(g2, g) < 1e-5


@pytest.mark.parametrize("head_dim", [64, 128])
def test_pallas_model_head_dims(head_dim):
    q, k, v, slopes, state0, segment_ids, _, _ = random_case(head_dim, 1, 5, 1, head_dim, jnp.bfloat16, packed=True)
    o, final = lightning_attention(q, k, v, slopes, initial_state=state0, segment_ids=segment_ids,
                                   return_final_state=True, impl="pallas", interpret=True)
    want_o, want_final = reference_lightning_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                                       v.astype(jnp.float32), slopes, initial_state=state0,
                                                       segment_ids=segment_ids)
    assert rel_err(o, want_o) < 1e-2 and rel_err(final, want_final) < 1e-2


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_pallas_decode_matches_recurrence_step(dtype, tol):
    q, k, v, slopes, state0, _, _, _ = random_case(11, 3, 2, 2, 32, dtype, packed=False)
    state = state0
    want_o, want_final = reference_lightning_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                                       v.astype(jnp.float32), slopes, initial_state=state0)
    for t in range(q.shape[1]):
        o, state = lightning_decode(q[:, t], k[:, t], v[:, t], slopes, state, impl="pallas", interpret=True)
        assert o.dtype == dtype and state.dtype == jnp.float32
        assert rel_err(o, want_o[:, t]) < tol
    assert rel_err(state, want_final) < tol


def test_pallas_bad_inputs():
    q, k, v, slopes, state0, _, _, _ = random_case(0, 1, 4, 2, 24, jnp.float32, packed=False)
    with pytest.raises(ValueError, match="head dim D = 24"):
        lightning_attention(q, k, v, slopes, impl="pallas", interpret=True)
    with pytest.raises(ValueError, match="head dim D = 24"):
        lightning_decode(q[:, 0], k[:, 0], v[:, 0], slopes, state0, impl="pallas", interpret=True)
    q16 = jnp.zeros((1, 4, 2, 16))
    with pytest.raises(ValueError, match="needs a GPU"):
        lightning_attention(q16, q16, q16, slopes, impl="pallas")
    for block in (24, 256):
        with pytest.raises(ValueError, match=r"block_size must be one of \(16, 32, 64, 128\)"):
            lightning_attention(q16, q16, q16, slopes, impl="pallas", block_size=block, interpret=True)
    with pytest.raises(ValueError, match="slopes must have shape"):
        lightning_attention(q16, q16, q16, slopes[:1], impl="pallas", interpret=True)
    with pytest.raises(ValueError, match="k must have q's dtype"):
        lightning_attention(q16, q16.astype(jnp.bfloat16), q16, slopes, impl="pallas", interpret=True)
    # auto never picks the kernel on the CPU, and takes any head dim
    assert lightning_attention(q, k, v, slopes).shape == q.shape


def test_forward_tiling_choice_by_shape():
    """The measured rule: chunk kernels up to 16K tokens, the sweep beyond, and the sweep for short rows at head
    dim <= 64 with B * H >= 512 in bf16, 64-token chunks with fewer (float32 keeps its chunk tiling)."""
    from pallas_kernels.lightning_attention.chunk_kernel import ChunkConfig
    from pallas_kernels.lightning_attention.pallas_attention import choose_forward_config
    bf16 = jnp.bfloat16
    assert isinstance(choose_forward_config((16, 1000, 64, 64), bf16), SweepConfig)
    assert isinstance(choose_forward_config((64, 1024, 8, 32), bf16), SweepConfig)
    few_pairs = choose_forward_config((16, 1000, 8, 64), bf16)  # few (row, head) pairs: 64-token chunks
    assert isinstance(few_pairs, ChunkConfig) and few_pairs.chunk_blocks == 1
    assert isinstance(choose_forward_config((16, 1025, 64, 64), bf16), ChunkConfig)
    assert isinstance(choose_forward_config((16, 1000, 64, 128), bf16), ChunkConfig)
    assert isinstance(choose_forward_config((16, 1000, 64, 64), jnp.float32), ChunkConfig)
    assert isinstance(choose_forward_config((1, 16385, 8, 128), bf16), SweepConfig)


def test_backward_tiling_choice_by_shape():
    """The measured rule: the forward's sweep when it is one; whole 128-column programs (8 warps, one span per row)
    with at least 256 (row, head) pairs in bf16; the default 64-column tiles and spans otherwise."""
    from pallas_kernels.lightning_attention.chunk_kernel import ChunkConfig
    from pallas_kernels.lightning_attention.pallas_attention import choose_backward_config
    bf16, default = jnp.bfloat16, SweepConfig()
    forward_sweep = SweepConfig(target_programs=0)
    assert choose_backward_config((16, 1000, 64, 128), bf16, forward_sweep) is forward_sweep
    wide = choose_backward_config((16, 1000, 64, 128), bf16, ChunkConfig())
    assert (wide.block_v, wide.num_warps, wide.target_programs) == (128, 8, 0)
    assert choose_backward_config((4, 4099, 64, 128), bf16, ChunkConfig()) == wide
    assert choose_backward_config((1, 16384, 64, 128), bf16, ChunkConfig()) == default  # 64 pairs: columns
    assert choose_backward_config((4, 8192, 16, 128), bf16, ChunkConfig()) == default
    assert choose_backward_config((16, 1000, 64, 64), bf16, ChunkConfig()) == default  # 64 columns are all of D
    assert choose_backward_config((16, 1000, 64, 128), jnp.float32, ChunkConfig()) == default


def test_pallas_whole_column_backward_at_head_dim_128():
    """The wide backward tiling (all 128 columns per program, 8 warps) against the recurrence, ragged and packed."""
    case = random_case(128, 2, BLOCK + 5, 1, 128, jnp.float32, packed=True)
    q, k, v, slopes, state0, segment_ids, do, dfinal = case
    pallas = lambda q, k, v, s, s0: pallas_lightning_attention(
        q, k, v, s, initial_state=s0, segment_ids=segment_ids, config=SweepConfig(block=BLOCK, block_v=16),
        backward_config=SweepConfig(block=BLOCK, block_v=128, num_warps=8, target_programs=0), interpret=True)
    reference = lambda q, k, v, s, s0: reference_lightning_attention(q, k, v, s, initial_state=s0,
                                                                     segment_ids=segment_ids)
    run = jax.jit(value_and_grads, static_argnums=(0, 1))
    _, _, got = run(pallas, (0, 1, 2, 4), q, k, v, slopes, state0, do, dfinal)
    _, _, want = run(reference, (0, 1, 2, 4), q, k, v, slopes, state0, do, dfinal)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-4
