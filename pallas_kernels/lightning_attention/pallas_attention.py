"""Lightning attention through the Pallas sweep kernel, differentiable with `jax.custom_vjp`.

Forward: one forward sweep over (q, k, v) gives o and the final state. Backward, with o_i = q_i S_i
and S_i the state after token i, G_i the gradient reaching S_i (from later queries and the final
state):

  dq_i = do_i S_i^T   forward sweep over (do, v, k), state S^T       (starts from S0^T)
  dv_j = k_j G_j      reverse sweep over (k, q, do), state G         (starts from dS_final; ends at dS0)
  dk_j = G_j v_j      reverse sweep over (v, do, q), state G^T       (starts from dS_final^T)

No activations beyond q, k, v, o and the final state are kept. The slope gradient needs no extra
sweep: every term decays as exp(-s (p_query - p_key)), so
dL/ds = sum_t p_t (k_t . dk_t - do_t . o_t) - p_last <dS_final, S_final> + p_(-1) <S0, dS0>
with positions p taken relative to any fixed origin (the row's centre, to keep the sums small).
"""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.lightning_attention.chunked import chunked_lightning_attention
from pallas_kernels.lightning_attention.reference import segment_starts
from pallas_kernels.lightning_attention.sweep_kernel import SweepConfig, sweep


def _pad_time(x, padded, mode="constant"):
    extra = padded - x.shape[1]
    return x if extra == 0 else jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2), mode=mode)


def _transpose_state(state):
    return None if state is None else jnp.swapaxes(state, -1, -2)


def _run_sweep(a, b, c, *, slopes, state_in, runs, reverse, config, interpret):
    """One sweep on (B, T, H, D) inputs: pads T up to whole blocks (zeros; runs repeat the last)."""
    num_tokens = a.shape[1]
    padded = -(-num_tokens // config.block) * config.block
    a, b, c = (_pad_time(x, padded) for x in (a, b, c))
    runs = None if runs is None else _pad_time(runs, padded, mode="edge")
    y, state_out = sweep(a, b, c, slopes, state_in, runs, num_tokens=num_tokens, reverse=reverse, config=config,
                         interpret=interpret)
    return y[:, :num_tokens], state_out


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attention(q, k, v, slopes, state0, runs, config, backward_config, interpret):
    return _forward(q, k, v, slopes, state0, runs, config, backward_config, interpret)[0]


def _forward(q, k, v, slopes, state0, runs, config, backward_config, interpret):
    o, final_state = _run_sweep(q, k, v, slopes=slopes, state_in=state0, runs=runs, reverse=False, config=config,
                                interpret=interpret)
    return (o, final_state), (q, k, v, slopes, state0, runs)


def _backward(config, backward_config, interpret, residuals, cotangents):
    q, k, v, slopes, state0, runs = residuals
    do, dfinal = cotangents
    do = do.astype(q.dtype)
    run = functools.partial(_run_sweep, slopes=slopes, runs=runs, config=backward_config, interpret=interpret)
    dq, _ = run(do, v, k, state_in=_transpose_state(state0), reverse=False)
    dv, dstate0 = run(k, q, do, state_in=dfinal, reverse=True)
    dk, _ = run(v, do, q, state_in=_transpose_state(dfinal), reverse=True)

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

    _, pullback = jax.vjp(attention, slopes)
    return pullback((do, dfinal))[0]


_attention.defvjp(_forward, _backward)


def pallas_lightning_attention(q, k, v, slopes, *, initial_state=None, segment_ids=None, config=None,
                               backward_config=None, interpret=False):
    """Lightning attention on the Pallas kernels (arguments as in ops.lightning_attention, already checked).

    config / backward_config: SweepConfig of the forward sweep / the three backward sweeps.
    Returns (o (B, T, H, D) in q.dtype, final state (B, H, D, D) float32)."""
    config = config or SweepConfig()
    backward_config = backward_config or config
    batch, num_tokens = q.shape[:2]
    runs = None
    if segment_ids is not None:  # run index: how many segment starts up to each token
        runs = jnp.cumsum(segment_starts(segment_ids, num_tokens, batch), axis=1, dtype=jnp.int32)
    state0 = None if initial_state is None else initial_state.astype(jnp.float32)
    return _attention(q, k, v, slopes.astype(jnp.float32), state0, runs, config, backward_config, interpret)
