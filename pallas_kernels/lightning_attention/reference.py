"""Lightning attention, the slow and obviously-correct way: a recurrence over time.

For one head with decay slope s and key/value state S (D x D, float32):

    S_t = exp(-s) S_{t-1} + k_t^T v_t        (S_{-1} = the initial state, or zeros)
    o_t = q_t S_t

which unrolls to o_i = sum_{t<=i} exp(-s (i-t)) (q_i . k_t) v_t + exp(-s (i+1)) q_i S_{-1}.
Packed rows carry segment ids: wherever segment_ids[t] != segment_ids[t-1] the state is reset
(multiplied by zero) before token t is added, so a token sees only earlier tokens of its own segment
and the initial state reaches the first segment only.

Everything here runs in float32 through `jax.lax.scan`; it is differentiable and is the ground truth
for the chunked path and the Pallas kernels.
"""
import jax
import jax.numpy as jnp


def segment_starts(segment_ids, num_tokens, batch):
    """(B, T) bool: True where a new segment starts at t >= 1 (never at t = 0)."""
    if segment_ids is None:
        return jnp.zeros((batch, num_tokens), dtype=bool)
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros((batch, 1), dtype=bool), changed], axis=1)


def reference_lightning_attention(q, k, v, slopes, *, initial_state=None, segment_ids=None):
    """Recurrence over time.

    q, k, v: (B, T, H, D); slopes: (H,); initial_state: (B, H, D, D) or None; segment_ids: (B, T) or None.
    Returns (o (B, T, H, D) in q.dtype, final state (B, H, D, D) float32).
    """
    batch, num_tokens, heads, head_dim = q.shape
    decay = jnp.exp(-slopes.astype(jnp.float32))[None, :, None, None]  # (1, H, 1, 1)
    state = (jnp.zeros((batch, heads, head_dim, head_dim), jnp.float32) if initial_state is None
             else initial_state.astype(jnp.float32))
    resets = segment_starts(segment_ids, num_tokens, batch)

    def step(state, inputs):
        q_t, k_t, v_t, reset_t = inputs  # (B, H, D) x3, (B,)
        keep = jnp.where(reset_t, 0.0, 1.0)[:, None, None, None]
        state = keep * decay * state + jnp.einsum("bhd,bhe->bhde", k_t, v_t)
        o_t = jnp.einsum("bhd,bhde->bhe", q_t, state)
        return state, o_t

    as_f32_time_major = lambda x: jnp.moveaxis(x.astype(jnp.float32), 1, 0)
    final_state, o = jax.lax.scan(
        step, state, (as_f32_time_major(q), as_f32_time_major(k), as_f32_time_major(v), resets.T))
    return jnp.moveaxis(o, 0, 1).astype(q.dtype), final_state

