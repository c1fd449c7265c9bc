"""The chunk-parallel forward kernels (interpret mode on the CPU) against the time recurrence.

Small blocks (16) keep interpret mode fast. Lengths cover one token, a block minus/plus one, a chunk
plus a remainder and several chunks with a ragged last one; chunks of 1, 2 and 3 blocks; several
state tiles and output-column tiles per head; packed rows with uneven (sometimes one-token) segments
and an initial state. Gradients go through the backward sweeps (custom VJP) after a chunk forward.

Ragged rows: q, k, v reach the kernels unpadded and the kernels mask the rows past T themselves (interpret mode
pads a block that runs past the array end with NaN, so an unmasked read of those rows shows up as NaN). The ragged
cases run a document across the row's last chunk boundary, check against both twins (the recurrence and the chunked
JAX path), check that a ragged row's outputs are bit for bit the prefix of a longer row's, and check that the
traced forward and backward hold no T-sized pad or slice around the pallas_calls.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from pallas_kernels.lightning_attention.chunk_kernel import ChunkConfig
from pallas_kernels.lightning_attention.chunked import chunked_lightning_attention
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


def across_last_chunk(segment_ids, num_tokens, chunk):
    """segment_ids whose last document starts 2 tokens before the row's last chunk (so before its last block) and
    runs to the row's end: a packed run crossing into the ragged tail."""
    start = max(1, (num_tokens - 1) // chunk * chunk - 2)
    return segment_ids.at[:, start:].set(7)


@pytest.mark.parametrize("num_tokens,chunk_blocks,dtype,with_state", [
    (5, 2, jnp.float32, True),                    # shorter than one block
    (BLOCK, 2, jnp.bfloat16, False),              # exactly one block
    (2 * BLOCK + 1, 2, jnp.float32, True),        # chunk + 1
    (2 * BLOCK + 1, 2, jnp.bfloat16, True),
    (3 * BLOCK - 1, 2, jnp.float32, False),       # ragged block inside a ragged chunk
    (4 * BLOCK, 2, jnp.bfloat16, True),           # whole chunks
    (4 * BLOCK + 1, 4, jnp.bfloat16, False)])     # chunk of 4 blocks + 1
def test_chunk_forward_ragged_rows_match_both_twins(num_tokens, chunk_blocks, dtype, with_state):
    config = ChunkConfig(block=BLOCK, chunk_blocks=chunk_blocks, state_tile=16, block_v=16)
    q, k, v, slopes, state0, segment_ids = random_case(200 + num_tokens, 2, num_tokens, 2, 32, dtype, packed=True,
                                                       with_state=with_state)
    segment_ids = across_last_chunk(segment_ids, num_tokens, config.chunk_len(num_tokens))
    o, final = jax.jit(lambda q, k, v: pallas_lightning_attention(
        q, k, v, slopes, initial_state=state0, segment_ids=segment_ids, config=config, interpret=True))(q, k, v)
    tol = 1e-4 if dtype == jnp.float32 else 1e-2
    assert o.shape == q.shape and o.dtype == dtype
    assert np.isfinite(np.asarray(o, np.float32)).all() and np.isfinite(np.asarray(final)).all()
    as_f32 = lambda x: x.astype(jnp.float32)
    for twin in (reference_lightning_attention, chunked_lightning_attention):
        want_o, want_final = twin(as_f32(q), as_f32(k), as_f32(v), slopes, initial_state=state0,
                                  segment_ids=segment_ids)
        assert rel_err(o, want_o) < tol, (twin.__name__, rel_err(o, want_o))
        assert rel_err(final, want_final) < tol, (twin.__name__, rel_err(final, want_final))


@pytest.mark.parametrize("num_tokens,dtype", [(2 * BLOCK + 1, jnp.float32), (3 * BLOCK + 5, jnp.bfloat16)])
def test_chunk_forward_ragged_row_is_the_prefix_of_a_longer_row(num_tokens, dtype):
    """Masked tail rows act exactly as the zero padding did: a ragged row's outputs equal, bit for bit, the first
    rows of the same row continued to whole chunks (the same chunk boundaries; the extra keys only meet queries
    after them, with weight 0)."""
    config = ChunkConfig(block=BLOCK, chunk_blocks=2, state_tile=16, block_v=16)
    longer = 4 * BLOCK
    assert config.chunk_len(num_tokens) == config.chunk_len(longer)
    q, k, v, slopes, state0, segment_ids = random_case(300 + num_tokens, 2, longer, 2, 32, dtype, packed=True)
    segment_ids = across_last_chunk(segment_ids, num_tokens, config.chunk_len(num_tokens))
    run = lambda T: pallas_lightning_attention(
        q[:, :T], k[:, :T], v[:, :T], slopes, initial_state=state0, segment_ids=segment_ids[:, :T], config=config,
        interpret=True)[0]
    np.testing.assert_array_equal(np.asarray(run(num_tokens), np.float32),
                                  np.asarray(run(longer)[:, :num_tokens], np.float32))


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (jit, custom_vjp, scan bodies...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (tuple, list)) else (param,)):
                sub = sub.jaxpr if isinstance(sub, jex_core.ClosedJaxpr) else sub
                if isinstance(sub, jex_core.Jaxpr):
                    yield from _equations(sub)


@pytest.mark.parametrize("config", [ChunkConfig(), SweepConfig()], ids=["chunk", "sweep"])
def test_ragged_rows_reach_the_kernels_without_padding_copies(config):
    """At an odd T the traced forward (and its backward sweeps) pass q, k, v to the pallas_calls as they are: no
    pad to whole chunks and no slice of a padded output, i.e. no extra T-sized HBM copy. Checked on the jaxpr
    (the same on the GPU and in interpret mode, whose lowering adds its own padding); the backward's dead slope
    gradient (chunked JAX, which pads) is removed first, as XLA removes it under jit."""
    pe = pytest.importorskip("jax._src.interpreters.partial_eval")  # dce_jaxpr: no public DCE in jax 0.11
    shape = (2, 1000, 4, 128)  # T = 1000: 15.6 blocks of 64, 7.8 chunks of 128
    q = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    segment_ids = jax.ShapeDtypeStruct(shape[:2], jnp.int32)
    slopes = jnp.linspace(0.1, 0.5, shape[2])

    def forward(q, k, v, segment_ids):
        return pallas_lightning_attention(q, k, v, slopes, segment_ids=segment_ids, config=config,
                                          backward_config=SweepConfig())

    def loss(q, k, v, segment_ids):
        o, final = forward(q, k, v, segment_ids)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    for name, f, expected_calls in (("forward", forward, 2), ("backward", jax.grad(loss, argnums=(0, 1, 2)), 6)):
        closed = jax.make_jaxpr(f)(q, q, q, segment_ids)
        jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
        equations = list(_equations(jaxpr))
        calls = [eqn for eqn in equations if eqn.primitive.name == "pallas_call"]
        assert len(calls) >= expected_calls, (name, len(calls))
        assert any(shape in [var.aval.shape for var in eqn.invars] for eqn in calls), name  # unpadded operands
        copies = [(eqn.primitive.name, [var.aval.shape for var in eqn.invars])
                  for eqn in equations if eqn.primitive.name in ("pad", "slice", "dynamic_slice", "concatenate")
                  and any(getattr(var.aval, "size", 0) >= np.prod(shape) for var in (*eqn.invars, *eqn.outvars))]
        assert not copies, (name, copies)


def _triton_kernels(monkeypatch, f, *args):
    """[(kernel name, Triton IR text)] of the pallas_calls in f, lowered for CUDA on this CPU-only machine: the
    Triton lowering runs in Python, only its device query needs a GPU, so a fake H200 answers it."""
    registration = pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")
    gpu_info = pytest.importorskip("jax._src.pallas.triton.gpu_info")
    try:
        lower_module = registration.lowering.lower_jaxpr_to_triton_module
        h200 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200)
    except AttributeError as error:  # private API of jax 0.11: moved in another version
        pytest.skip(f"the Pallas Triton lowering changed: {error}")
    kernels = []

    def capture(jaxpr, *rest, **kwargs):
        result = lower_module(jaxpr, *rest, **kwargs)
        kernels.append((jaxpr.debug_info.func_name, result.module.operation.get_asm()))
        return result

    monkeypatch.setattr(registration.gpu_info_lib, "get_gpu_info", lambda: h200)
    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", capture)
    jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
    return kernels


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
@pytest.mark.parametrize("num_tokens", [1000, 1024])
def test_ragged_rows_are_masked_in_the_triton_kernels(monkeypatch, num_tokens):
    """What interpret mode cannot see (it pads every block that runs past the array end and drops what is written
    there): the Pallas Triton lowering masks nothing by itself, so on the GPU every load of q, k, v rows that may
    lie past T and every store of output rows must carry a mask (`tt.load ptr, mask, other`, `tt.store ptr, value,
    mask`). At whole chunks (T = 1024) no access is masked: the same code as when the inputs were padded."""
    shape = (2, num_tokens, 4, 128)
    q = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    segment_ids = jax.ShapeDtypeStruct(shape[:2], jnp.int32)
    slopes = jnp.linspace(0.1, 0.5, shape[2])

    def forward_and_backward(q, k, v, segment_ids):
        def loss(q, k, v):
            o, final = pallas_lightning_attention(q, k, v, slopes, segment_ids=segment_ids, config=ChunkConfig(),
                                                  backward_config=SweepConfig())
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    kernels = _triton_kernels(monkeypatch, forward_and_backward, q, q, q, segment_ids)
    # the chunk forward; the backward's forward sweep (dq) and two reverse sweeps (dv, dk); rows of 16 blocks are cut
    # into spans of 4, so the dq and dv sweeps first run a states-only pass (dk reuses dv's entering states)
    assert sorted(name for name, _ in kernels) == sorted([
        "lightning_chunk_states", "lightning_chunk_output", "lightning_states", "lightning_sweep",
        "lightning_states_reverse", "lightning_sweep_reverse", "lightning_sweep_reverse"]), [n for n, _ in kernels]
    # masked row loads: q and the diagonal block's k, v (chunk output); k, v (chunk states); a, b, c (sweeps);
    # b, c (states-only passes); and in the kernels that write rows, the store's load of the old value (jax lowers
    # a store as a swap), masked like the store. The output kernel's earlier key blocks lie before the last
    # block and load unmasked.
    masked_row_loads = {"lightning_chunk_output": 4, "lightning_chunk_states": 2, "lightning_states": 2,
                        "lightning_states_reverse": 2, "lightning_sweep": 4, "lightning_sweep_reverse": 4}
    for name, ir in kernels:
        masked_loads = len(re.findall(r"tt\.load %\w+, %\w+", ir))
        stores = re.findall(r"tt\.store (%\w+(?:, %\w+)*) : tensor<[^>]*!tt\.ptr<(\w+)>", ir)
        masked_stores = [dtype for operands, dtype in stores if operands.count(",") == 2]
        if num_tokens % ChunkConfig().chunk_len(num_tokens) == 0:
            assert masked_loads == 0 and not masked_stores, name
            continue
        assert masked_loads == masked_row_loads[name], (name, masked_loads)
        # output rows (bf16, the input dtype) only through masked stores; the float32 states and the chunk states
        # kernel's per-chunk state tiles (bf16) never run past their arrays and stay unmasked
        if name in ("lightning_chunk_output", "lightning_sweep", "lightning_sweep_reverse"):
            row_stores = [dtype for _, dtype in stores if dtype == "bf16"]
            assert row_stores and masked_stores == row_stores, (name, stores)
        else:
            assert not masked_stores, (name, stores)
