"""Chunk-parallel lightning attention forward (Pallas, Triton backend): chunk states, then every block at once.

The sweep (sweep_kernel.py) carries the state through the blocks of a row inside one program: its
forward has B*H*(D/BV) programs, each walking T/64 blocks one after the other with four matmuls on
the serial path. Here a row is cut into chunks of C = chunk_blocks * block tokens and the forward
runs as two kernels:

  1. chunk_states: one program per (row, head, BK x BV tile of the D x D state) walks the chunks and
     stores the state entering each one, with one matmul per chunk on the serial path:
         S_0 = S0 (or zeros),   S_{c+1} = exp(-s C) S_c + sum_{j in chunk c} exp(-s (C-1-j)) k_j^T v_j
     and the state after the last token (float32).
  2. chunk_output: one program per (query block of `block` tokens, BV output columns, head, row), all
     independent. With p the position of a token inside its chunk and S_c the state entering the chunk:
         o_i = exp(-s (p_i + 1)) q_i S_c + sum_{j <= i, j in the chunk} exp(-s (p_i - p_j)) (q_i . k_j) v_j
     the sum taken one key block at a time, causal inside the chunk (flash attention without a softmax).
     A key block before the query block weighs pair (r, c) by exp(-s (r+1)) exp(-s (block*(i-j) - 1 - c)):
     both exponents are >= 0, so no decay is ever formed from exp(+s t).

Bytes: q, k, v and o once, k and v again in kernel 1, and one D x D state per chunk written and read
once. The states are stored in the input dtype (the sweep also rounds its state to the input dtype
as a matmul operand); at C = 128 and D = 128 they are one q-sized tensor each way (8 tensors in all).

Packed rows follow the sweep's rules: run indices (segment number of each token) mask pairs from
different runs; the state entering a chunk reaches only tokens in the run of the token before the
chunk; a chunk's contributions to the outgoing state keep only the run of its last real token.

Ragged rows (T not a multiple of the chunk): q, k, v come in unpadded, as (B, T, H, D), and o goes out
as (B, T, H, D): padding them to whole chunks and slicing o back cost four extra q-sized HBM copies
(about 2 GB at (16, 1000, 64, 128): an estimated 0.5 ms of the 1.42 ms forward on an H200). Only the
run indices (B, T) int32 are padded to whole chunks (repeating the last run). The grid covers
ceil(T / block) query blocks and k, v are taken as whole-row blocks of ceil(T / C) * C rows, so the
last chunk and the last query block run past row T - 1. Those rows act as the zero padding did: k, v
(and q) rows at t >= T load as zeros, and the last chunk's decays end at token T - 1 (so they never
touch the final state); output rows at t >= T are never written. At T a multiple of the chunk nothing
is masked (`ragged` is static): the kernels are the same code as when the inputs were padded.

What this relies on, read in jax 0.11.2 (jax/_src/pallas/triton/):
  - The Triton lowering does NOT clip or mask a block that runs past the array end. In lowering.py,
    `lower_jaxpr_to_triton_module` hands each kernel ref over as a bare `!tt.ptr` to the whole operand
    (BlockInfo keeps the full array shape and the block's start index from `_eval_index_map`);
    `_compute_offsets_from_indices` adds (start + index) * stride with the full array's strides and
    no bounds check; `_masked_load_lowering_rule` / `_load` emit `tt.load(ptr, mask, other)` with only
    the mask and fill the kernel passes (none for `ref[...]`), and `_masked_swap_lowering_rule` /
    `_store` emit a store (plus a load of the old value) with only the kernel's mask.
    pallas_call_registration.py's `pallas_call_lowering` passes the operands to the custom call as they
    are. So an unmasked access to row t >= T of batch row b would hit row t - T of batch row b + 1 (or
    memory past the buffer for the last b): an unmasked load reads another row's values (or faults)
    and an unmasked store overwrites another program's output.
  - Hence every access that may cross T is masked explicitly (common.py `load_rows` / `store_rows`,
    i.e. `plgpu.load(ref.at[rows], mask=row < T, other=0)` and `plgpu.store(..., mask=row < T)`): in
    Triton a masked-off lane of `tt.load` is not read from memory and takes `other`, and a masked-off
    lane of `tt.store` is not written; the out-of-range pointers are formed but never dereferenced.
    Masked here: the k, v loads of every chunk (states kernel), the q load, the diagonal key block's
    k, v loads and the o store (output kernel). The output kernel's earlier key blocks come before the
    last block, so they are in range and load unmasked. A block larger than its array is accepted
    (the pallas_call machinery does not check it) and costs nothing on the GPU (a ref is a pointer).
  - Interpret mode differs: hlo_interpreter.py `_pad_to_block_dimension` pads every operand to whole
    blocks with `uninitialized_value` (NaN for floats, INT_MIN for ints) and slices the outputs back.
    A missing load mask therefore shows as NaN in the CPU tests; a missing store mask or a missing q
    mask (it only feeds rows that are never written) does not, so test_lightning_chunk.py lowers the
    kernels for CUDA on the CPU and checks the masks in the Triton IR.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.lightning_attention.common import (block_end_decays, block_runs, decay_to, dot, from_start,
                                                       load_rows, matmul_precision, pair_decay, run_before,
                                                       store_rows)


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
    """Tiling of the chunk-parallel forward: `block` tokens per output program (and per key step),
    chunks of `chunk_blocks` blocks (states are stored at chunk starts), the states kernel's square
    tile `state_tile` of the D x D state, and `block_v` output columns per output program.

    Pipeline stages (H200, 2026-12-01, benchmarks/lightning_tiling.py --part forward, ms against stages 2 / 2):
    the states kernel's k, v loads three deep and the output kernel's one deep were fastest or within 1% at 7 of
    the 8 grid shapes with 128-token chunks, e.g. (1, 16384, 64, 128) 0.700 / 0.742, (1, 16384, 64, 64) 0.338 /
    0.427; 7% slower at (8, 2047, 32, 64), 0.164 / 0.153 (benchmarks/RESULTS.md, "The forward's pipeline
    stages")."""
    block: int = 64
    chunk_blocks: int = 2
    state_tile: int = 64
    block_v: int = 128
    num_warps: int = 4
    num_stages: int = 1
    states_num_warps: int = 4
    states_num_stages: int = 3

    def __post_init__(self):
        for name in ("block", "chunk_blocks", "state_tile", "block_v"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"ChunkConfig.{name} must be a power of two (Triton tiles are), got {value}")

    def chunk_len(self, num_tokens):
        """Tokens per chunk for a row of `num_tokens`: chunk_blocks blocks, fewer for a short row, but always a
        power of two of them, since the chunk is a tile dimension (Triton refuses e.g. a (192, 32) tile)."""
        row_blocks = max(1, -(-num_tokens // self.block))
        return self.block * min(self.chunk_blocks, 1 << (row_blocks - 1).bit_length())


def _states_kernel(*refs, chunk, num_chunks, num_tokens, last_in_tail, has_state, packed):
    refs = list(refs)
    slope_ref, k_ref, v_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    state_in_ref = refs.pop(0) if has_state else None
    runs_ref = refs.pop(0) if packed else None
    states_ref, final_ref = refs

    dtype = k_ref.dtype
    neg_s = -slope_ref[...].astype(jnp.float32)  # (1,)
    end_decays = block_end_decays(neg_s, jnp.arange(chunk, dtype=jnp.int32), chunk, num_chunks, last_in_tail)
    ragged = last_in_tail != chunk - 1  # static: the last chunk runs past the row's end (its tail rows load as 0)

    def body(c, state):
        states_ref[c] = state.astype(states_ref.dtype)  # the state entering chunk c
        k, v = (load_rows(ref, c * chunk, chunk, num_tokens, ragged) for ref in (k_ref, v_ref))
        last, key_decay, carry = end_decays(c)  # a ragged last chunk's decays end at its last real token
        if packed:
            runs, before, run_last = block_runs(runs_ref, c, chunk, last)
            key_decay = jnp.where(runs == run_last, key_decay, 0.0)
            carry = jnp.where(run_last == before, carry, 0.0)
        update = dot((k * key_decay[:, None]).astype(dtype), v, matmul_precision(dtype), ((0,), (0,)))  # (BK, BV)
        return carry * state + update

    state = (state_in_ref[...].astype(jnp.float32) if has_state
             else jnp.zeros(final_ref.shape, jnp.float32))
    final_ref[...] = jax.lax.fori_loop(0, num_chunks, body, state)


def _output_kernel(*refs, block, chunk_blocks, col_tiles, num_tokens, packed):
    refs = list(refs)
    slope_ref, q_ref, k_ref, v_ref, states_ref = (refs.pop(0) for _ in range(5))
    runs_ref = refs.pop(0) if packed else None
    (o_ref,) = refs

    dtype = q_ref.dtype
    precision = matmul_precision(dtype)
    query_block = pl.program_id(0) // col_tiles
    first = (query_block // chunk_blocks) * chunk_blocks  # first block of this chunk
    neg_s = -slope_ref[...].astype(jnp.float32)  # (1,)
    pos = jnp.arange(block, dtype=jnp.int32)
    starts = from_start(neg_s, pos)  # exp(-s (r+1))
    ragged = num_tokens % block != 0  # static: the last query block runs past the row's end
    in_block = num_tokens - query_block * block  # rows of this query block before the row's end (may be > block)
    q = load_rows(q_ref, 0, block, in_block, ragged)  # (block, D)
    if packed:
        query_runs = runs_ref[pl.ds(query_block * block, block)]

    # the state entering the chunk reaches query row r at chunk position p = block*(i-first) + r
    query_decay = starts * jnp.exp(neg_s * (block * (query_block - first)).astype(jnp.float32))
    if packed:
        query_decay = jnp.where(query_runs == run_before(runs_ref, first * block), query_decay, 0.0)
    acc = dot((q * query_decay[:, None]).astype(dtype), states_ref[...].astype(dtype), precision)  # (block, BV)

    def add_block(key_block, weights, acc, ragged=False):  # only the diagonal block can run past the row's end
        start = key_block * block
        if packed:
            weights = jnp.where(query_runs[:, None] == runs_ref[pl.ds(start, block)][None, :], weights, 0.0)
        k, v = (load_rows(ref, start, block, num_tokens, ragged) for ref in (k_ref, v_ref))
        scores = dot(q, k, precision, ((1,), (1,)))  # (block, block)
        return acc + dot((scores * weights).astype(dtype), v, precision)

    def earlier_block(key_block, acc):  # every pair is causal; decay exp(-s (r+1)) exp(-s (block*(i-j) - 1 - c))
        key_decay = decay_to(neg_s, pos, block * (query_block - key_block) - 1)
        return add_block(key_block, starts[:, None] * key_decay[None, :], acc)

    acc = jax.lax.fori_loop(first, query_block, earlier_block, acc)
    acc = add_block(query_block, pair_decay(neg_s, pos), acc, ragged)
    store_rows(o_ref, 0, acc.astype(o_ref.dtype), in_block, ragged)


def chunk_forward(q, k, v, slopes, state_in, runs, *, config, interpret):
    """The chunk-parallel forward on unpadded inputs (the kernels mask the ragged last chunk themselves).

    q, k, v: (B, T, H, D); slopes (H,) f32; state_in (B, H, D, D) f32 or None (zeros);
    runs (B, Tp) int32 run index of each token, or None, with Tp = T rounded up to whole chunks of
    config.chunk_len(T) (padded by repeating the last run).
    Returns (o (B, T, H, D) in q.dtype, final state (B, H, D, D) f32).
    """
    batch, num_tokens, heads, head_dim = q.shape
    block, chunk = config.block, config.chunk_len(num_tokens)
    num_chunks = -(-num_tokens // chunk)
    padded = num_chunks * chunk  # the whole-row blocks of k and v span whole chunks, past T when T is ragged
    if runs is not None and runs.shape != (batch, padded):
        raise ValueError(f"runs must be padded to whole chunks: shape {(batch, padded)}, got {runs.shape}")
    dtype = q.dtype
    slopes = slopes.astype(jnp.float32)
    tile = min(config.state_tile, head_dim)
    state_tiles = head_dim // tile
    slope_spec = pl.BlockSpec((1,), lambda g, h, b: (h,))
    runs_spec = pl.BlockSpec((None, padded), lambda g, h, b: (b, 0))
    key_tile = lambda g: g // state_tiles

    # 1. the state entering each chunk, and the final state
    state_spec = pl.BlockSpec((None, None, tile, tile), lambda g, h, b: (b, h, key_tile(g), g % state_tiles))
    in_specs = [slope_spec,
                pl.BlockSpec((None, padded, None, tile), lambda g, h, b: (b, 0, h, key_tile(g))),
                pl.BlockSpec((None, padded, None, tile), lambda g, h, b: (b, 0, h, g % state_tiles))]
    operands = [slopes, k, v]
    if state_in is not None:
        in_specs.append(state_spec)
        operands.append(state_in.astype(jnp.float32))
    if runs is not None:
        in_specs.append(runs_spec)
        operands.append(runs)
    states, final_state = pl.pallas_call(
        functools.partial(_states_kernel, chunk=chunk, num_chunks=num_chunks, num_tokens=num_tokens,
                          last_in_tail=num_tokens - 1 - (num_chunks - 1) * chunk,
                          has_state=state_in is not None, packed=runs is not None),
        grid=(state_tiles * state_tiles, heads, batch),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, num_chunks, tile, tile),
                                lambda g, h, b: (b, h, 0, key_tile(g), g % state_tiles)),
                   state_spec],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, num_chunks, head_dim, head_dim), dtype),
                   jax.ShapeDtypeStruct((batch, heads, head_dim, head_dim), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=config.states_num_warps,
                                             num_stages=config.states_num_stages),
        interpret=interpret,
        name="lightning_chunk_states",
    )(*operands)

    # 2. every output block from its chunk's entering state and the keys of its chunk up to itself
    block_v = min(config.block_v, head_dim)
    col_tiles = head_dim // block_v
    query_blocks = -(-num_tokens // block)
    chunk_blocks = chunk // block
    in_specs = [slope_spec,
                pl.BlockSpec((None, block, None, head_dim), lambda g, h, b: (b, g // col_tiles, h, 0)),
                pl.BlockSpec((None, padded, None, head_dim), lambda g, h, b: (b, 0, h, 0)),
                pl.BlockSpec((None, padded, None, block_v), lambda g, h, b: (b, 0, h, g % col_tiles)),
                pl.BlockSpec((None, None, None, head_dim, block_v),
                             lambda g, h, b: (b, h, (g // col_tiles) // chunk_blocks, 0, g % col_tiles))]
    operands = [slopes, q, k, v, states]
    if runs is not None:
        in_specs.append(runs_spec)
        operands.append(runs)
    o = pl.pallas_call(
        functools.partial(_output_kernel, block=block, chunk_blocks=chunk_blocks, col_tiles=col_tiles,
                          num_tokens=num_tokens, packed=runs is not None),
        grid=(query_blocks * col_tiles, heads, batch),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, block, None, block_v), lambda g, h, b: (b, g // col_tiles, h, g % col_tiles)),
        out_shape=jax.ShapeDtypeStruct((batch, num_tokens, heads, head_dim), dtype),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="lightning_chunk_output",
    )(*operands)
    return o, final_state
