"""The one-token lightning attention step in plain jnp: the production decode off the GPU and for large batches.

    new_state = exp(-s) state + k^T v        o = q @ new_state        (per sequence and head, float32)

XLA fuses this into one pass over the (B, H, D, D) float32 state, as fast as the fused Pallas kernel
(pallas_decode.py) once there are many (sequence, head) rows; ops.lightning_decode picks between them. Its slow
twin in the tests is the time recurrence of reference.py.
"""
import jax.numpy as jnp


def jnp_lightning_decode(q, k, v, slopes, state):
    """One decode step.

    Args:
      q, k, v: (B, H, D), one token per sequence.
      slopes: (H,) positive decay per head.
      state: (B, H, D, D) the KV state after the previous token.
    Returns:
      (o (B, H, D) in q.dtype, new state (B, H, D, D) float32).
    """
    decay = jnp.exp(-slopes.astype(jnp.float32))[None, :, None, None]
    new_state = decay * state.astype(jnp.float32) + jnp.einsum(
        "bhd,bhe->bhde", k.astype(jnp.float32), v.astype(jnp.float32))
    o = jnp.einsum("bhd,bhde->bhe", q.astype(jnp.float32), new_state)
    return o.astype(q.dtype), new_state
