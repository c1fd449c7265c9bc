"""The Pallas (Triton backend) kernel behind every lightning attention pass: a sweep over blocks.

One program owns one (batch row, head, tile of BV output columns, segment of consecutive blocks) and
walks the blocks of C tokens of its segment in order (or in reverse), carrying a (D, BV) float32
state. For a block with rows a, b (C, D) and c (C, BV), local positions i, j and slope s:

  forward sweep  y_i = sum_{j<=i} exp(-s (i-j)) (a_i . b_j) c_j + (exp(-s (i+1)) a_i) @ R
                 R  <- exp(-s (e+1)) R + sum_j exp(-s (e-j)) b_j^T c_j
  reverse sweep  y_j = sum_{i>=j} exp(-s (i-j)) (a_j . b_i) c_i + (exp(-s (e-j)) a_j) @ R
                 R  <- exp(-s (e+1)) R + sum_i exp(-s (i+1)) b_i^T c_i

where e is the block's last real token (C - 1, or less in a padded tail block). The forward sweep
with (a, b, c) = (q, k, v) is the attention itself (R = the KV state); the backward pass is three
more sweeps (see pallas_attention.py). Packed rows pass run indices (segment number of each token):
pairs from different runs are masked, the carried state reaches only tokens in the run of the token
before the block, and a block's contributions to the outgoing state keep only the run of token e.

Sequence parallelism: a row is cut into segments of whole blocks that run as separate programs.
A `states_only` sweep first gives each segment's own contribution to the state (from zero, no y);
the caller chains those into the state entering each segment (a short scan over segments, see
pallas_attention.py) and the full sweep starts every segment from its entering state.

Matmuls run in the input dtype (bf16 tensor cores) with float32 accumulation; decays and the state
are float32 (the state is rounded to the input dtype only as a matmul operand).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Tiling of one sweep: block length C, output columns BV per program, Triton launch settings, and
    sequence parallelism: rows are cut into segments until about `target_programs` programs run, each
    segment holding at least `min_segment_blocks` blocks (target_programs=0: one segment per row)."""
    block: int = 64
    block_v: int = 64
    num_warps: int = 4
    num_stages: int = 3
    target_programs: int = 512
    min_segment_blocks: int = 4

    def blocks_per_segment(self, batch, heads, head_dim, num_tokens):
        num_blocks = -(-num_tokens // self.block)
        base = batch * heads * (head_dim // min(self.block_v, head_dim))
        wanted = max(1, -(-self.target_programs // base)) if self.target_programs else 1
        return min(num_blocks, max(self.min_segment_blocks, -(-num_blocks // wanted)))


def _dot(x, y, precision, contract_x=1):
    """(M, K) @ (K, N) (or x^T @ y when contract_x == 0) with float32 accumulation."""
    return jax.lax.dot_general(x, y, (((contract_x,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _sweep_kernel(*refs, block, num_blocks, segment_blocks, num_segments, col_tiles, last_in_tail, reverse,
                  has_state, packed, states_only):
    refs = list(refs)
    slope_ref = refs.pop(0)
    a_ref = None if states_only else refs.pop(0)
    b_ref, c_ref = refs.pop(0), refs.pop(0)
    state_in_ref = refs.pop(0) if has_state else None
    runs_ref = refs.pop(0) if packed else None
    y_ref = None if states_only else refs.pop(0)
    (state_out_ref,) = refs

    dtype = b_ref.dtype
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    neg_s = -slope_ref[...].astype(jnp.float32)  # (1,)
    pos = jnp.arange(block, dtype=jnp.int32)
    row, col = pos[:, None], pos[None, :]
    distance = (col - row) if reverse else (row - col)  # >= 0 where the pair interacts
    pair_decay = jnp.where(distance >= 0, jnp.exp(neg_s * jnp.maximum(distance, 0).astype(jnp.float32)), 0.0)
    from_start = jnp.exp(neg_s * (pos + 1).astype(jnp.float32))  # exp(-s (i+1))

    def to_last(last):  # exp(-s (e-j)) for j <= e, else 0
        gap = last - pos
        return jnp.where(gap >= 0, jnp.exp(neg_s * jnp.maximum(gap, 0).astype(jnp.float32)), 0.0)

    full_to_last = to_last(block - 1)
    full_carry = jnp.exp(neg_s * float(block))
    if num_segments == 1:  # static trip count
        segment, first, count = 0, 0, num_blocks
    else:
        segment = pl.program_id(2) // col_tiles
        first = segment * segment_blocks
        count = jnp.minimum(segment_blocks, num_blocks - first)

    def body(step, state):
        blk = first + ((count - 1 - step) if reverse else step)
        rows = pl.ds(blk * block, block)
        b, c = b_ref[rows, :], c_ref[rows, :]
        if last_in_tail != block - 1:  # padded tail block: decays end at its last real token
            is_tail = blk == num_blocks - 1
            last = (block - 1) - is_tail.astype(jnp.int32) * (block - 1 - last_in_tail)
            decay_to_last = to_last(last)
            carry_decay = jnp.where(is_tail, jnp.exp(neg_s * float(last_in_tail + 1)), full_carry)
        else:
            last, decay_to_last, carry_decay = block - 1, full_to_last, full_carry
        weights = pair_decay
        if packed:
            runs = runs_ref[rows]
            run_before = jnp.where(blk == 0, 0, runs_ref[pl.ds(jnp.maximum(blk * block - 1, 0), 1)])
            run_last = runs_ref[pl.ds(blk * block + last, 1)]
            weights = jnp.where(runs[:, None] == runs[None, :], weights, 0.0)
            sees_before = jnp.where(runs == run_before, from_start, 0.0)
            reaches_last = jnp.where(runs == run_last, decay_to_last, 0.0)
            carry_decay = jnp.where(run_last == run_before, carry_decay, 0.0)
        else:
            sees_before, reaches_last = from_start, decay_to_last
        out_decay, update_decay = (reaches_last, sees_before) if reverse else (sees_before, reaches_last)

        if not states_only:
            a = a_ref[rows, :]
            scores = jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                                         preferred_element_type=jnp.float32)  # (C, C)
            y = _dot((scores * weights).astype(dtype), c, precision)
            y += _dot((a * out_decay[:, None]).astype(dtype), state.astype(dtype), precision)
            y_ref[rows, :] = y.astype(y_ref.dtype)
        update = _dot((b * update_decay[:, None]).astype(dtype), c, precision, contract_x=0)  # (D, BV)
        return carry_decay * state + update

    state = (state_in_ref[...].astype(jnp.float32) if has_state
             else jnp.zeros(state_out_ref.shape, jnp.float32))
    state = jax.lax.fori_loop(0, count, body, state)
    if states_only or num_segments == 1:
        state_out_ref[...] = state
    else:  # only the segment that ends the sweep holds the final state
        @pl.when(segment == (0 if reverse else num_segments - 1))
        def _():
            state_out_ref[...] = state


def sweep(a, b, c, slopes, state_in, runs, *, num_tokens, reverse, config, segment_blocks, interpret,
          states_only=False):
    """Run one sweep over rows cut into segments of `segment_blocks` blocks.

    a, b, c: (B, Tp, H, D) with Tp a multiple of config.block (padded with zeros; a is ignored when
    states_only); num_tokens: the real length T <= Tp; slopes (H,) f32; runs (B, Tp) int32 run index
    of each token, or None; state_in (B, H, P, D, D) f32: the state entering each of the P segments
    (in sweep order), or None for zeros.
    Returns (y (B, Tp, H, D) in b.dtype, the state after the whole sweep (B, H, D, D) f32), or with
    states_only each segment's own state contribution (B, H, P, D, D) f32.
    """
    batch, padded, heads, head_dim = b.shape
    block, block_v = config.block, min(config.block_v, head_dim)
    num_blocks = padded // block
    num_segments = -(-num_blocks // segment_blocks)
    col_tiles = head_dim // block_v
    last_in_tail = num_tokens - 1 - (num_blocks - 1) * block
    grid = (batch, heads, col_tiles * num_segments)
    whole_rows = pl.BlockSpec((None, padded, None, head_dim), lambda i, h, g: (i, 0, h, 0))
    column_tile = pl.BlockSpec((None, padded, None, block_v), lambda i, h, g: (i, 0, h, g % col_tiles))
    segment_state = pl.BlockSpec((None, None, None, head_dim, block_v),
                                 lambda i, h, g: (i, h, g // col_tiles, 0, g % col_tiles))
    final_state = pl.BlockSpec((None, None, head_dim, block_v), lambda i, h, g: (i, h, 0, g % col_tiles))
    in_specs = [pl.BlockSpec((1,), lambda i, h, g: (h,))]
    operands = [slopes.astype(jnp.float32)]
    if not states_only:
        in_specs.append(whole_rows)
        operands.append(a)
    in_specs += [whole_rows, column_tile]
    operands += [b, c]
    if state_in is not None:
        in_specs.append(segment_state)
        operands.append(state_in)
    if runs is not None:
        in_specs.append(pl.BlockSpec((None, padded), lambda i, h, g: (i, 0)))
        operands.append(runs)
    segment_states = jax.ShapeDtypeStruct((batch, heads, num_segments, head_dim, head_dim), jnp.float32)
    if states_only:
        out_specs, out_shape = [segment_state], [segment_states]
    else:
        out_specs = [column_tile, final_state]
        out_shape = [jax.ShapeDtypeStruct(b.shape, b.dtype),
                     jax.ShapeDtypeStruct((batch, heads, head_dim, head_dim), jnp.float32)]
    kernel = functools.partial(
        _sweep_kernel, block=block, num_blocks=num_blocks, segment_blocks=segment_blocks,
        num_segments=num_segments, col_tiles=col_tiles, last_in_tail=last_in_tail, reverse=reverse,
        has_state=state_in is not None, packed=runs is not None, states_only=states_only)
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name=f"lightning_{'states' if states_only else 'sweep'}{'_reverse' if reverse else ''}",
    )(*operands)
    return out[0] if states_only else tuple(out)
