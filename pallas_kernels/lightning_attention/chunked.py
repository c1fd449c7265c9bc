"""Lightning attention in blocks, pure JAX (the CPU path and the kernels' blocked twin).

The sequence is cut into blocks of C tokens. With S the state entering a block (after its previous
token), local positions i, j in [0, C) and one head of slope s:

    intra:  o_i += sum_{j<=i} exp(-s (i-j)) (q_i . k_j) v_j           [(Q K^T) * M] V
    inter:  o_i += exp(-s (i+1)) q_i S                               (Q * query decays) S
    state:  S'  = exp(-s C) S + sum_j exp(-s (C-1-j)) k_j^T v_j       S decayed + (K * key decays)^T V

Decays are formed from non-negative distances only (never exp(+s t)), in float32. Packed rows: a
token's run index r_t counts segment starts up to t; two tokens interact only when their run
indices agree, the incoming state reaches token i only when r_i equals the run of the token before
the block, and the state leaving a block keeps only the run of its last token.

Any T: the tail is padded to a whole block. The state leaving the last block is taken at the last
real token e (C is replaced by e + 1 above and padded keys are masked), so padding never changes
the final state. One `lax.scan` over blocks, each block under `jax.checkpoint`: memory stays
linear in T under autodiff.
"""
import jax
import jax.numpy as jnp

from pallas_kernels.lightning_attention.common import run_indices

DEFAULT_BLOCK_SIZE = 64


def _block_step(slopes, state, block):
    """One block. state (B, H, D, D) f32; q/k/v (B, H, C, D); runs (B, C); run_before (B,); last () int."""
    q, k, v, runs, run_before, last = block
    block_len = q.shape[2]
    pos = jnp.arange(block_len)
    neg_s = -slopes[:, None, None]  # (H, 1, 1)

    distance = pos[:, None] - pos[None, :]  # (C, C), i - j
    same_run = runs[:, :, None] == runs[:, None, :]  # (B, C, C)
    visible = (distance >= 0)[None] & same_run
    decay_ij = jnp.exp(neg_s * jnp.maximum(distance, 0)[None])  # (H, C, C)
    mask = jnp.where(visible[:, None], decay_ij[None], 0.0)  # (B, H, C, C)
    scores = jnp.einsum("bhid,bhjd->bhij", q, k, preferred_element_type=jnp.float32)
    intra = jnp.einsum("bhij,bhje->bhie", (scores * mask).astype(v.dtype), v,
                       preferred_element_type=jnp.float32)

    sees_state = (runs == run_before[:, None])[:, None, :]  # (B, 1, C)
    query_decay = jnp.where(sees_state, jnp.exp(neg_s[:, :, 0] * (pos + 1))[None], 0.0)  # (B, H, C)
    inter = jnp.einsum("bhid,bhde->bhie", q.astype(jnp.float32) * query_decay[..., None], state)

    run_last = jnp.take(runs, last, axis=1)  # (B,)
    to_last = last - pos  # (C,)
    key_decay = jnp.exp(neg_s[:, :, 0] * jnp.maximum(to_last, 0))  # (H, C)
    key_alive = (to_last >= 0)[None] & (runs == run_last[:, None])  # (B, C)
    key_decay = jnp.where(key_alive[:, None, :], key_decay[None], 0.0)  # (B, H, C)
    state_alive = (run_last == run_before)[:, None, None, None]
    carried = jnp.where(state_alive, jnp.exp(-slopes * (last + 1))[None, :, None, None] * state, 0.0)
    new_state = carried + jnp.einsum("bhjd,bhje->bhde", k.astype(jnp.float32) * key_decay[..., None],
                                     v.astype(jnp.float32))
    return new_state, intra + inter


def chunked_lightning_attention(q, k, v, slopes, *, initial_state=None, segment_ids=None, block_size=None):
    """Blocked lightning attention.

    q, k, v: (B, T, H, D) same dtype; slopes (H,); initial_state (B, H, D, D) or None;
    segment_ids (B, T) or None; block_size C (default 64; capped at T).
    Returns (o (B, T, H, D) in q.dtype, final state (B, H, D, D) float32).
    """
    batch, num_tokens, heads, head_dim = q.shape
    block = min(block_size or DEFAULT_BLOCK_SIZE, num_tokens)
    num_blocks = -(-num_tokens // block)
    padded = num_blocks * block
    slopes = slopes.astype(jnp.float32)

    runs = jnp.zeros((batch, num_tokens), jnp.int32) if segment_ids is None else run_indices(segment_ids)  # (B, T)
    runs = jnp.pad(runs, ((0, 0), (0, padded - num_tokens)), mode="edge")
    run_before = jnp.concatenate(
        [jnp.zeros((batch, 1), jnp.int32), runs[:, block - 1:padded - 1:block]], axis=1)  # (B, nb)
    last = jnp.full((num_blocks,), block - 1, jnp.int32).at[-1].set(num_tokens - 1 - (num_blocks - 1) * block)

    def to_blocks(x):  # (B, T, H, D) -> (nb, B, H, C, D)
        x = jnp.pad(x, ((0, 0), (0, padded - num_tokens), (0, 0), (0, 0)))
        return x.reshape(batch, num_blocks, block, heads, head_dim).transpose(1, 0, 3, 2, 4)

    state = (jnp.zeros((batch, heads, head_dim, head_dim), jnp.float32) if initial_state is None
             else initial_state.astype(jnp.float32))
    step = jax.checkpoint(lambda s, blk: _block_step(slopes, s, blk))
    final_state, o = jax.lax.scan(
        step, state,
        (to_blocks(q), to_blocks(k), to_blocks(v), runs.reshape(batch, num_blocks, block).transpose(1, 0, 2),
         run_before.T, last))
    o = o.transpose(1, 0, 3, 2, 4).reshape(batch, padded, heads, head_dim)[:, :num_tokens]
    return o.astype(q.dtype), final_state
