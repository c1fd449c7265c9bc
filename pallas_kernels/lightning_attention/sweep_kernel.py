"""The Pallas (Triton backend) kernel behind every lightning attention pass: a sweep over blocks.

One program owns one (batch row, head, tile of BV output columns, span of consecutive blocks) and
walks the blocks of C tokens of its span in order (or in reverse), carrying a (D, BV) float32
state. For a block with rows a, b (C, D) and c (C, BV), local positions i, j and slope s:

  forward sweep  y_i = sum_{j<=i} exp(-s (i-j)) (a_i . b_j) c_j + (exp(-s (i+1)) a_i) @ R
                 R  <- exp(-s (e+1)) R + sum_j exp(-s (e-j)) b_j^T c_j
  reverse sweep  y_j = sum_{i>=j} exp(-s (i-j)) (a_j . b_i) c_i + (exp(-s (e-j)) a_j) @ R
                 R  <- exp(-s (e+1)) R + sum_i exp(-s (i+1)) b_i^T c_i

where e is the block's last real token (C - 1, or less in the ragged tail block). The forward sweep
with (a, b, c) = (q, k, v) is the attention itself (R = the KV state); the backward pass is three
more sweeps (see pallas_attention.py). Packed rows pass run indices (document number of each token):
pairs from different runs are masked, the carried state reaches only tokens in the run of the token
before the block, and a block's contributions to the outgoing state keep only the run of token e.

Sequence parallelism: a row is cut into spans of whole blocks that run as separate programs ("span",
not "segment": segments are the packed documents of segment_ids). A `states_only` sweep first gives
each span's own contribution to the state (from zero, no y); the caller chains those into the state
entering each span (a short scan over spans, see pallas_attention.py) and the full sweep starts every
span from its entering state.

Matmuls run in the input dtype (bf16 tensor cores) with float32 accumulation; decays and the state
are float32 (the state is rounded to the input dtype only as a matmul operand).

Ragged rows: a, b, c come in unpadded (B, T, H, D) and y goes out as (B, T, H, D); only the run indices
are padded to whole blocks. The whole-row blocks span ceil(T / C) * C rows, so the last block runs past
row T - 1: its a, b, c rows at t >= T load as zeros through masked loads and its y rows there are not
stored (masked store). The Pallas Triton lowering masks nothing by itself; chunk_kernel.py's docstring
says what it does with such a block and why the explicit masks make it safe on the GPU.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.lightning_attention.common import (block_end_decays, block_runs, dot, from_start, load_rows,
                                                       matmul_precision, pair_decay, store_rows)

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Tiling of one sweep: block length C, output columns BV per program, Triton launch settings, and
    sequence parallelism: rows are cut into spans until about `target_programs` programs run, each
    span holding at least `min_span_blocks` blocks (target_programs=0: one span per row)."""
    block: int = 64
    block_v: int = 64
    num_warps: int = 4
    num_stages: int = 3
    target_programs: int = 512
    min_span_blocks: int = 4

    def blocks_per_span(self, batch, heads, head_dim, num_tokens):
        num_blocks = -(-num_tokens // self.block)
        base = batch * heads * (head_dim // min(self.block_v, head_dim))
        wanted = max(1, -(-self.target_programs // base)) if self.target_programs else 1
        return min(num_blocks, max(self.min_span_blocks, -(-num_blocks // wanted)))


def _sweep_kernel(*refs, block, num_blocks, span_blocks, num_spans, col_tiles, num_tokens, last_in_tail, reverse,
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
    precision = matmul_precision(dtype)
    neg_s = -slope_ref[...].astype(jnp.float32)  # (1,)
    pos = jnp.arange(block, dtype=jnp.int32)
    pair_weights = pair_decay(neg_s, pos, reverse)
    starts = from_start(neg_s, pos)  # exp(-s (i+1))
    end_decays = block_end_decays(neg_s, pos, block, num_blocks, last_in_tail)
    ragged = last_in_tail != block - 1  # static: the last block runs past the row's end (its tail rows load as 0)
    if num_spans == 1:  # static trip count
        span, first, count = 0, 0, num_blocks
    else:
        span = pl.program_id(2) // col_tiles
        first = span * span_blocks
        count = jnp.minimum(span_blocks, num_blocks - first)

    def body(step, state):
        blk = first + ((count - 1 - step) if reverse else step)
        start = blk * block
        b, c = (load_rows(ref, start, block, num_tokens, ragged) for ref in (b_ref, c_ref))
        last, decay_to_last, carry_decay = end_decays(blk)  # a ragged tail block's decays end at its last real token
        weights = pair_weights
        if packed:
            runs, run_before, run_last = block_runs(runs_ref, blk, block, last)
            weights = jnp.where(runs[:, None] == runs[None, :], weights, 0.0)
            sees_before = jnp.where(runs == run_before, starts, 0.0)
            reaches_last = jnp.where(runs == run_last, decay_to_last, 0.0)
            carry_decay = jnp.where(run_last == run_before, carry_decay, 0.0)
        else:
            sees_before, reaches_last = starts, decay_to_last
        out_decay, update_decay = (reaches_last, sees_before) if reverse else (sees_before, reaches_last)

        if not states_only:
            a = load_rows(a_ref, start, block, num_tokens, ragged)
            scores = jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                                         preferred_element_type=jnp.float32)  # (C, C)
            y = dot((scores * weights).astype(dtype), c, precision)
            y += dot((a * out_decay[:, None]).astype(dtype), state.astype(dtype), precision)
            store_rows(y_ref, start, y.astype(y_ref.dtype), num_tokens, ragged)
        update = dot((b * update_decay[:, None]).astype(dtype), c, precision, ((0,), (0,)))  # (D, BV)
        return carry_decay * state + update

    state = (state_in_ref[...].astype(jnp.float32) if has_state
             else jnp.zeros(state_out_ref.shape, jnp.float32))
    state = jax.lax.fori_loop(0, count, body, state)
    if states_only or num_spans == 1:
        state_out_ref[...] = state
    else:  # only the span that ends the sweep holds the final state
        @pl.when(span == (0 if reverse else num_spans - 1))
        def _():
            state_out_ref[...] = state


def sweep(a, b, c, slopes, state_in, runs, *, reverse, config, span_blocks, interpret,
          states_only=False):
    """Run one sweep over rows cut into spans of `span_blocks` blocks.

    a, b, c: (B, T, H, D), unpadded (the kernel masks the ragged last block; a is ignored when
    states_only); slopes (H,) f32; runs (B, Tp) int32 run index of each token, or None, with Tp = T
    rounded up to whole blocks (padded by repeating the last run); state_in (B, H, P, D, D) f32: the
    state entering each of the P spans (in sweep order), or None for zeros.
    Returns (y (B, T, H, D) in b.dtype, the state after the whole sweep (B, H, D, D) f32), or with
    states_only each span's own state contribution (B, H, P, D, D) f32.
    """
    batch, num_tokens, heads, head_dim = b.shape
    block, block_v = config.block, min(config.block_v, head_dim)
    num_blocks = -(-num_tokens // block)
    padded = num_blocks * block  # the whole-row blocks span whole blocks, past T when T is ragged
    if runs is not None and runs.shape != (batch, padded):
        raise ValueError(f"runs must be padded to whole blocks: shape {(batch, padded)}, got {runs.shape}")
    num_spans = -(-num_blocks // span_blocks)
    col_tiles = head_dim // block_v
    last_in_tail = num_tokens - 1 - (num_blocks - 1) * block
    grid = (batch, heads, col_tiles * num_spans)
    whole_rows = pl.BlockSpec((None, padded, None, head_dim), lambda i, h, g: (i, 0, h, 0))
    column_tile = pl.BlockSpec((None, padded, None, block_v), lambda i, h, g: (i, 0, h, g % col_tiles))
    span_state = pl.BlockSpec((None, None, None, head_dim, block_v),
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
        in_specs.append(span_state)
        operands.append(state_in)
    if runs is not None:
        in_specs.append(pl.BlockSpec((None, padded), lambda i, h, g: (i, 0)))
        operands.append(runs)
    span_states = jax.ShapeDtypeStruct((batch, heads, num_spans, head_dim, head_dim), jnp.float32)
    if states_only:
        out_specs, out_shape = [span_state], [span_states]
    else:
        out_specs = [column_tile, final_state]
        out_shape = [jax.ShapeDtypeStruct(b.shape, b.dtype),
                     jax.ShapeDtypeStruct((batch, heads, head_dim, head_dim), jnp.float32)]
    kernel = functools.partial(
        _sweep_kernel, block=block, num_blocks=num_blocks, span_blocks=span_blocks,
        num_spans=num_spans, col_tiles=col_tiles, num_tokens=num_tokens, last_in_tail=last_in_tail, reverse=reverse,
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
