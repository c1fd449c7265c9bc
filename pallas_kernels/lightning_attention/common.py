"""Helpers shared by the lightning attention kernels (chunk_kernel.py, sweep_kernel.py) and their wrappers.

Within a block (or chunk) of L tokens at local positions i, j in [0, L), slope s and neg_s = -s:

    pair decay       exp(-s (i - j)) for j <= i, else 0            (reverse sweeps: exp(-s (j - i)) for j >= i)
    from start       exp(-s (i + 1))                                the state entering the block reaching token i
    to last          exp(-s (e - j)) for j <= e, else 0             token j's key reaching the state after token e
    carry            exp(-s (e + 1))                                the entering state surviving to after token e

where e is the block's last real token: L - 1, or less in the ragged tail block of a row whose length T is not a
multiple of L. Decays are formed from non-negative distances only (never exp(+s t)), in float32.

Ragged rows: q, k, v and the outputs are (B, T, H, D) arrays that are NOT padded to whole blocks; the kernels take
blocks that run past token T - 1 and read / write the rows of a block through `load_rows` / `store_rows`, which mask
the rows at tokens >= T (see chunk_kernel.py's docstring for why that is safe on the GPU). Run indices are small and
are padded to whole blocks (repeating the last run).

Packed rows: the run index of token t counts the document starts (segment_ids changes) up to t. Two tokens interact
only in the same run; the state entering a block reaches token i only when i's run is the run of the token before
the block (`run_before`); a block's contribution to the outgoing state keeps only the run of its token e.
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def run_indices(segment_ids: jax.Array) -> jax.Array:
    """(B, T) int segment ids -> (B, T) int32 run index: how many times the id changed up to t (0 at t = 0)."""
    changed = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
    first = jnp.zeros((segment_ids.shape[0], 1), jnp.int32)
    return jnp.concatenate([first, jnp.cumsum(changed, axis=1, dtype=jnp.int32)], axis=1)


def dot(x, y, precision, contract=((1,), (0,))):
    """x @ y (or x^T y, x y^T by `contract`, the contracted dims of x and y) with float32 accumulation."""
    return jax.lax.dot_general(x, y, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32)


def matmul_precision(dtype):
    """Full float32 matmuls for float32 inputs (not TF32); the default (bf16 tensor cores) otherwise."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def decay_to(neg_s, pos, last):
    """(L,) float32: exp(-s (last - j)) for positions j <= last, else 0."""
    gap = last - pos
    return jnp.where(gap >= 0, jnp.exp(neg_s * jnp.maximum(gap, 0).astype(jnp.float32)), 0.0)


def pair_decay(neg_s, pos, reverse=False):
    """(L, L) float32 weights of query row i and key column j inside one block: exp(-s |i - j|) where the pair
    interacts (j <= i; j >= i for a reverse sweep), else 0."""
    row, col = pos[:, None], pos[None, :]
    distance = (col - row) if reverse else (row - col)
    return jnp.where(distance >= 0, jnp.exp(neg_s * jnp.maximum(distance, 0).astype(jnp.float32)), 0.0)


def from_start(neg_s, pos):
    """(L,) float32: exp(-s (i + 1)), how much of the state entering a block reaches local position i."""
    return jnp.exp(neg_s * (pos + 1).astype(jnp.float32))


def block_end_decays(neg_s, pos, length: int, num_blocks: int, last_in_tail: int):
    """index -> (e, to_last (L,), carry ()) for block `index` of a row of num_blocks blocks of `length` tokens:
    e its last real token, to_last = decay_to(e), carry = exp(-s (e + 1)). Only the last block can be a ragged tail
    (its last real token `last_in_tail`, static); full blocks reuse values computed once, outside the kernel's loop.
    """
    full_to_last, full_carry = decay_to(neg_s, pos, length - 1), jnp.exp(neg_s * float(length))
    if last_in_tail == length - 1:
        return lambda index: (length - 1, full_to_last, full_carry)

    def at(index):
        is_tail = index == num_blocks - 1
        last = (length - 1) - is_tail.astype(jnp.int32) * (length - 1 - last_in_tail)
        return last, decay_to(neg_s, pos, last), jnp.where(is_tail, jnp.exp(neg_s * float(last_in_tail + 1)),
                                                           full_carry)
    return at


def _rows_before(start, length: int, limit):
    """(length, 1) bool: rows start .. start + length - 1 that lie before position `limit`."""
    return (start + jnp.arange(length, dtype=jnp.int32) < limit)[:, None]


def load_rows(ref, start, length: int, limit, ragged: bool):
    """ref[start : start + length, :]. With `ragged` (static: the rows may run past the end of the array) it is a
    masked load: rows at positions >= `limit` (the row length, in ref's coordinates) read as zeros and, on the GPU,
    are never read from memory. Without it a plain load, exactly the code of ref[pl.ds(start, length), :]."""
    rows = (pl.ds(start, length), slice(None))
    if not ragged:
        return ref[rows]
    return plgpu.load(ref.at[rows], mask=_rows_before(start, length, limit), other=0)


def store_rows(ref, start, value, limit, ragged: bool):
    """ref[start : start + len(value), :] = value; with `ragged`, a masked store that writes only the rows at
    positions < `limit` (nothing past the end of the array)."""
    rows = (pl.ds(start, value.shape[0]), slice(None))
    if not ragged:
        ref[rows] = value
    else:
        plgpu.store(ref.at[rows], value, mask=_rows_before(start, value.shape[0], limit))


def run_before(runs_ref, start):
    """(1,) int32: the run of the token before position `start` of a row's runs (0 for the row's first token)."""
    return jnp.where(start == 0, 0, runs_ref[pl.ds(jnp.maximum(start - 1, 0), 1)])


def block_runs(runs_ref, index, length: int, last):
    """Runs of block `index` (L,), the run before it (1,) and the run of its last real token `last` (1,)."""
    start = index * length
    return runs_ref[pl.ds(start, length)], run_before(runs_ref, start), runs_ref[pl.ds(start + last, 1)]
