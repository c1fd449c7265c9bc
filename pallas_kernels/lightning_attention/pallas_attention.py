"""Lightning attention through the Pallas kernels, differentiable with `jax.custom_vjp`.

Forward: the chunk-parallel kernels (chunk_kernel.py: states at chunk starts, then every output block
at once), or one forward sweep over (q, k, v) (sweep_kernel.py); both give o and the final state.
`choose_forward_config` picks one per shape (measurements in benchmarks/notes_lightning.md), and
`choose_backward_config` the backward sweeps' tiling.

Backward, with o_i = q_i S_i and S_i the state after token i, G_i the gradient reaching S_i (from later
queries and the final state):

  dq_i = do_i S_i^T   forward sweep over (do, v, k), state S^T       (starts from S0^T)
  dv_j = k_j G_j      reverse sweep over (k, q, do), state G         (starts from dS_final; ends at dS0)
  dk_j = G_j v_j      reverse sweep over (v, do, q), state G^T       (starts from dS_final^T)

No activations beyond q, k, v, o and the final state are kept. The slope gradient needs no extra
sweep: every term decays as exp(-s (p_query - p_key)), so
dL/ds = sum_t p_t (k_t . dk_t - do_t . o_t) - p_last <dS_final, S_final> + p_(-1) <S0, dS0>
with positions p taken relative to any fixed origin (the row's centre, to keep the sums small).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.lightning_attention.chunk_kernel import ChunkConfig, chunk_forward
from pallas_kernels.lightning_attention.chunked import chunked_lightning_attention
from pallas_kernels.lightning_attention.common import run_indices
from pallas_kernels.lightning_attention.sweep_kernel import SweepConfig, sweep


def _pad_time(x, padded, mode="constant"):
    extra = padded - x.shape[1]
    return x if extra == 0 else jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2), mode=mode)


def _transpose_state(state):
    return None if state is None else jnp.swapaxes(state, -1, -2)


def _span_carries(slopes, runs, num_tokens, span_len, num_spans):
    """(B or 1, H, P): how much of the state entering a span survives to its end (in either direction):
    exp(-s * span length), or 0 when a packed row starts a new document inside the span."""
    starts = jnp.arange(num_spans) * span_len
    ends = jnp.minimum(starts + span_len, num_tokens) - 1
    carries = jnp.exp(-slopes[None, :, None] * (ends - starts + 1).astype(jnp.float32)[None, None, :])
    if runs is not None:
        before = jnp.where(starts > 0, runs[:, jnp.maximum(starts - 1, 0)], 0)  # (B, P)
        carries = jnp.where((runs[:, ends] == before)[:, None, :], carries, 0.0)
    return carries


def _chain_spans(local_states, carries, state_in, reverse):
    """State entering each span, in sweep order: entering[next] = carry * entering[this] + local[this].
    local_states (B, H, P, D, D); carries (B or 1, H, P); state_in (B, H, D, D) or None (zeros)."""
    local_states = jnp.moveaxis(local_states, 2, 0)
    carries = jnp.broadcast_to(carries, local_states.shape[1:3] + carries.shape[2:])
    first = jnp.zeros(local_states.shape[1:], jnp.float32) if state_in is None else state_in

    def step(entering, span):
        local, carry = span
        return carry[..., None, None] * entering + local, entering

    _, entering = jax.lax.scan(step, first, (local_states, jnp.moveaxis(carries, 2, 0)), reverse=reverse)
    return jnp.moveaxis(entering, 0, 2)


def _run_sweep(a, b, c, *, slopes, state_in, runs, reverse, config, interpret, entering=None):
    """One sweep on (B, T, H, D) inputs, passed unpadded (the kernel masks the ragged last block; only the
    small runs are padded to whole blocks, repeating the last): cuts rows into spans, finds the state
    entering each span (or takes `entering`), sweeps.
    Returns (y (B, T, H, D), state after the sweep (B, H, D, D), entering states (B, H, P, D, D) or None)."""
    batch, num_tokens, heads, head_dim = a.shape
    padded = -(-num_tokens // config.block) * config.block
    runs = None if runs is None else _pad_time(runs, padded, mode="edge")
    span_blocks = config.blocks_per_span(batch, heads, head_dim, num_tokens)
    num_spans = -(-padded // (span_blocks * config.block))
    run = functools.partial(sweep, slopes=slopes, runs=runs, reverse=reverse, config=config,
                            span_blocks=span_blocks, interpret=interpret)
    if num_spans == 1:
        entering = None if state_in is None else state_in[:, :, None]
    elif entering is None:
        local = run(None, b, c, state_in=None, states_only=True)
        carries = _span_carries(slopes, runs, num_tokens, span_blocks * config.block, num_spans)
        entering = _chain_spans(local, carries, state_in, reverse)
    y, state_out = run(a, b, c, state_in=entering)
    return y, state_out, entering


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attention(q, k, v, slopes, state0, runs, config, backward_config, interpret):
    return _forward(q, k, v, slopes, state0, runs, config, backward_config, interpret)[0]


def _run_chunk_forward(q, k, v, *, slopes, state_in, runs, config, interpret):
    """The chunk-parallel forward on (B, T, H, D) inputs, passed unpadded (the kernels mask the ragged last
    chunk; only the small runs are padded to whole chunks, repeating the last).
    Returns (o (B, T, H, D), final state (B, H, D, D))."""
    num_tokens = q.shape[1]
    chunk = config.chunk_len(num_tokens)
    runs = None if runs is None else _pad_time(runs, -(-num_tokens // chunk) * chunk, mode="edge")
    return chunk_forward(q, k, v, slopes, state_in, runs, config=config, interpret=interpret)


def _forward(q, k, v, slopes, state0, runs, config, backward_config, interpret):
    if isinstance(config, ChunkConfig):
        o, final_state = _run_chunk_forward(q, k, v, slopes=slopes, state_in=state0, runs=runs, config=config,
                                            interpret=interpret)
        return (o, final_state), (q, k, v, slopes, state0, runs, None)
    o, final_state, entering = _run_sweep(q, k, v, slopes=slopes, state_in=state0, runs=runs, reverse=False,
                                          config=config, interpret=interpret)
    if backward_config != config:  # the backward cuts rows differently: it finds its own entering states
        entering = None
    return (o, final_state), (q, k, v, slopes, state0, runs, entering)


def _backward(config, backward_config, interpret, residuals, cotangents):
    q, k, v, slopes, state0, runs, entering = residuals
    do, dfinal = cotangents
    do = do.astype(q.dtype)
    run = functools.partial(_run_sweep, slopes=slopes, runs=runs, config=backward_config, interpret=interpret)
    dq, _, _ = run(do, v, k, state_in=_transpose_state(state0), reverse=False, entering=_transpose_state(entering))
    dv, dstate0, entering_grad = run(k, q, do, state_in=dfinal, reverse=True)
    dk, _, _ = run(v, do, q, state_in=_transpose_state(dfinal), reverse=True,
                   entering=_transpose_state(entering_grad))

    dslopes = _slope_gradient(q, k, v, slopes, state0, runs, do, dfinal)
    dstate0 = None if state0 is None else dstate0.astype(state0.dtype)
    return dq, dk, dv, dslopes, dstate0, None


def _slope_gradient(q, k, v, slopes, state0, runs, do, dfinal):
    """d loss / d slopes through the chunked pure-JAX path. Slopes are constants in the model, so under
    `jit` this is dead code that XLA removes; it runs only when a caller differentiates the slopes."""
    segment_ids = runs  # run indices change exactly where the segment ids do
    q, k, v, do = (x.astype(jnp.float32) for x in (q, k, v, do))  # this gradient is sensitive to rounding

    def attention(slopes):
        return chunked_lightning_attention(q, k, v, slopes, initial_state=state0, segment_ids=segment_ids)

    with jax.default_matmul_precision("highest"):  # float32 matmuls, not TF32, on GPUs
        _, pullback = jax.vjp(attention, slopes)
        return pullback((do, dfinal))[0]


_attention.defvjp(_forward, _backward)


# Measured on an H200 (bf16, D 128; benchmarks/notes_lightning.md): the chunk-parallel forward took
# 0.195 / 0.732 ms at T 4K / 16K (H 64) against the sweep's 0.256 / 0.740, but 3.207 ms at 64K against
# the sweep's 2.733: rows longer than this many tokens take the sweep.
CHUNK_FORWARD_MAX_TOKENS = 16384
# Short rows at head dim <= 64 (H200, 2026-11-30, benchmarks/lightning_grid.py, ms; sweep / 64-token chunks /
# 128-token chunks): with many (row, head) pairs the sweep's single kernel wins, (16, 1000, 64, 64) 0.155 / 0.303 /
# 0.293 and (64, 512, 16, 64) 0.090 / 0.159 / 0.163; with few, the sweep must cut rows into spans and chain their
# states, and 64-token chunks (more chunks, so more programs in the states pass) win, (16, 1000, 8, 64) 0.146 /
# 0.061 / 0.067 and (4, 1023, 32, 64) 0.111 / 0.101 / 0.238. So rows of at most this many tokens at D <= 64 take the
# sweep when B * H alone fills the sweep's target number of programs, 64-token chunks otherwise.
SWEEP_SHORT_ROWS_MAX_TOKENS = 1024


def choose_forward_config(shape, dtype, block=None):
    """The forward's tiling for q of `shape` (B, T, H, D): the chunk-parallel kernels up to
    CHUNK_FORWARD_MAX_TOKENS tokens per row, the sweep (rows cut into spans) for longer rows; short rows at head
    dim <= 64 take the sweep when B * H >= the sweep's target programs, else 64-token chunks. Float32 chunk tiles
    are smaller, to fit shared memory (the tiling that passed the float32 checks on the GPU)."""
    block = block or ChunkConfig.block
    if shape[1] > CHUNK_FORWARD_MAX_TOKENS:
        return SweepConfig(block=block)
    if shape[3] <= 64 and shape[1] <= SWEEP_SHORT_ROWS_MAX_TOKENS and dtype != jnp.float32:
        if shape[0] * shape[2] >= SweepConfig().target_programs:
            return SweepConfig(block=block)
        return ChunkConfig(block=block, chunk_blocks=1)
    if dtype == jnp.float32:
        return ChunkConfig(block=block, chunk_blocks=4, state_tile=32, block_v=64, num_stages=1,
                           states_num_stages=1)
    return ChunkConfig(block=block)


# Backward sweeps at head dim 128 (H200, 2026-12-01, benchmarks/lightning_tiling.py --part backward,
# forward+backward ms; two 64-column tiles, rows cut into spans for ~512 programs / all 128 columns with 8 warps,
# one span per row): with at least this many (row, head) pairs the wide tiling wins, (16, 1000, 64, 128)
# 2.530 / 1.518 and (4, 4099, 64, 128) 2.549 / 1.432; with 64 pairs the column tiles and spans are the
# parallelism, (4, 8192, 16, 128) 1.107 / 1.208 (wide, 8 spans) and (1, 16384, 64, 128) 1.994 / 1.944.
WIDE_BACKWARD_MIN_PAIRS = 256


def choose_backward_config(shape, dtype, forward_config):
    """The three backward sweeps' tiling for q of `shape` (B, T, H, D): the forward's when it is a sweep (its
    entering states are reused), else the default sweep; but with at least WIDE_BACKWARD_MIN_PAIRS (row, head)
    pairs at head dims above its 64 output columns (16-bit inputs), one program per (row, head) takes all D
    columns with 8 warps and its whole row: the pairs fill the card, and each column tile would re-read both row
    operands, each span add a states pass."""
    if isinstance(forward_config, SweepConfig):
        return forward_config
    config = SweepConfig()
    batch, _, heads, head_dim = shape
    if head_dim > config.block_v and batch * heads >= WIDE_BACKWARD_MIN_PAIRS and dtype != jnp.float32:
        return dataclasses.replace(config, block_v=head_dim, num_warps=8, target_programs=0)
    return config


def pallas_lightning_attention(q, k, v, slopes, *, initial_state=None, segment_ids=None, config=None,
                               backward_config=None, interpret=False):
    """Lightning attention on the Pallas kernels (arguments as in ops.lightning_attention, already checked).

    config: the forward's tiling, a ChunkConfig (chunk-parallel kernels) or a SweepConfig (one sweep);
      None: choose_forward_config. backward_config: SweepConfig of the three backward sweeps (None:
      choose_backward_config).
    Returns (o (B, T, H, D) in q.dtype, final state (B, H, D, D) float32)."""
    config = config or choose_forward_config(q.shape, q.dtype)
    backward_config = backward_config or choose_backward_config(q.shape, q.dtype, config)
    runs = None if segment_ids is None else run_indices(segment_ids)
    state0 = None if initial_state is None else initial_state.astype(jnp.float32)
    return _attention(q, k, v, slopes.astype(jnp.float32), state0, runs, config, backward_config, interpret)
