"""Public lightning attention ops: argument checks, then dispatch to one implementation.

lightning_attention impl: "naive" (the time recurrence in reference.py, the slow twin), "chunked" (pure-JAX
blocks in chunked.py), "pallas" (the Triton-backend kernels; on the CPU only with interpret=True), "auto"
(Pallas on a GPU when the head dim suits the kernel, the chunked path otherwise). The Pallas forward is picked
per shape by pallas_attention.choose_forward_config; the backward is always the sweeps.
lightning_decode impl: "jnp" (jnp_decode.py, the step XLA fuses), "pallas" (pallas_decode.py), "auto".
"""
import jax
import jax.numpy as jnp

from pallas_kernels.lightning_attention.chunked import chunked_lightning_attention
from pallas_kernels.lightning_attention.jnp_decode import jnp_lightning_decode
from pallas_kernels.lightning_attention.pallas_attention import choose_forward_config, pallas_lightning_attention
from pallas_kernels.lightning_attention.pallas_decode import pallas_lightning_decode
from pallas_kernels.lightning_attention.reference import reference_lightning_attention
from pallas_kernels.lightning_attention.sweep_kernel import SUPPORTED_HEAD_DIMS, SweepConfig

IMPLS = ("auto", "naive", "chunked", "pallas")
# Measured on an H200 (H=64, D=128): the fused kernel took half the jnp step's time at batch 1, the same at
# 16, 7% more at 256; "auto" decode uses it up to this many (sequence, head) rows.
DECODE_PALLAS_MAX_ROWS = 2048
DECODE_IMPLS = ("auto", "jnp", "pallas")
INPUT_DTYPES = (jnp.float32, jnp.bfloat16)


def _check_qkv(q, k, v, ndim, layout):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != ndim:
            raise ValueError(f"{name} must be {layout}, got shape {x.shape}")
        if x.dtype not in INPUT_DTYPES:
            raise ValueError(f"{name} must be float32 or bfloat16, got {x.dtype}; cast it first")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {q.shape}, got {x.shape}")
        if x.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}; cast q, k, v to one dtype")


def _check_slopes(slopes, heads):
    if slopes.shape != (heads,):
        raise ValueError(f"slopes must have shape (H,) = ({heads},), one positive decay per head, "
                         f"got {slopes.shape}")
    if not jnp.issubdtype(slopes.dtype, jnp.floating):
        raise ValueError(f"slopes must be floating point (float32), got {slopes.dtype}")


def _check_state(name, state, batch, heads, head_dim):
    want = (batch, heads, head_dim, head_dim)
    if state.shape != want:
        raise ValueError(f"{name} must have shape (B, H, D, D) = {want}, got {state.shape}")
    if not jnp.issubdtype(state.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point (float32), got {state.dtype}")


def _check_impl(impl, allowed):
    if impl not in allowed:
        raise ValueError(f"impl must be one of {allowed}, got {impl!r}")


def _on_gpu():
    return jax.default_backend() == "gpu"


def _resolve_impl(impl, head_dim, interpret, fallback):
    """'auto' -> 'pallas' on a GPU for a head dim the kernel takes, else `fallback`; checks 'pallas'."""
    if impl == "auto":
        return "pallas" if _on_gpu() and head_dim in SUPPORTED_HEAD_DIMS else fallback
    if impl == "pallas":
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"q's head dim D = {head_dim} is not one the Pallas kernel takes "
                             f"{SUPPORTED_HEAD_DIMS}; use impl='chunked' or pad D")
        if not (_on_gpu() or interpret):
            raise ValueError("impl='pallas' needs a GPU backend; pass interpret=True to run it on the CPU, "
                             "or use impl='chunked'")
    return impl


PALLAS_BLOCK_SIZES = (16, 32, 64, 128)  # 256 failed to compile on an H200 (shared memory), 128 ran


def _pallas_configs(block_size, shape, dtype):
    """(forward config, backward SweepConfig); None, None: the defaults."""
    if block_size is None:
        return None, None
    if block_size not in PALLAS_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {PALLAS_BLOCK_SIZES} for impl='pallas', got {block_size} "
                         "(larger blocks need more shared memory than a Hopper SM has; None picks the tuned 64)")
    return choose_forward_config(shape, dtype, block=block_size), SweepConfig(block=block_size)


def lightning_attention(q, k, v, slopes, *, initial_state=None, return_final_state=False, segment_ids=None,
                        impl="auto", block_size=None, interpret=False):
    """Lightning attention: o_i = sum_{t<=i, same segment} exp(-s_h (i-t)) (q_i . k_t) v_t
    (+ exp(-s_h (i+1)) q_i S0 for the initial state S0).

    Args:
      q, k, v: (B, T, H, D), one dtype (float32 or bfloat16), T >= 1.
      slopes: (H,) float32, positive: the decay s_h of each head.
      initial_state: (B, H, D, D) float32 or None (zeros): the KV state before token 0, decayed like a key at
        position -1. It reaches the first segment only.
      return_final_state: also return the state after the last token.
      segment_ids: (B, T) int or None. Packed rows: the state resets wherever segment_ids[t] != segment_ids[t-1],
        so tokens see only earlier tokens of their own segment (document).
      impl: "auto" (Pallas on GPU, chunked elsewhere), "naive", "chunked", "pallas".
      block_size: tokens per block of the chunked and Pallas paths; None picks the default (64).
      interpret: run the Pallas kernels in interpret mode (CPU tests of impl="pallas").
    Returns:
      o (B, T, H, D) in q.dtype; with return_final_state, (o, final state (B, H, D, D) float32), the final state
      being sum_t exp(-s (T-1-t)) k_t^T v_t over the last segment (plus the decayed initial state when the row
      has one segment).
    Raises:
      ValueError naming the argument for a wrong shape, dtype, impl or block size.
    """
    _check_qkv(q, k, v, 4, "(B, T, H, D)")
    batch, num_tokens, heads, head_dim = q.shape
    if num_tokens == 0:
        raise ValueError("q, k, v must hold at least one token (T >= 1), got T = 0")
    _check_slopes(slopes, heads)
    if initial_state is not None:
        _check_state("initial_state", initial_state, batch, heads, head_dim)
    if segment_ids is not None:
        if segment_ids.shape != (batch, num_tokens):
            raise ValueError(f"segment_ids must have shape (B, T) = {(batch, num_tokens)}, got {segment_ids.shape}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be integers, got {segment_ids.dtype}")
    if block_size is not None and (not isinstance(block_size, int) or block_size <= 0):
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
    _check_impl(impl, IMPLS)
    impl = _resolve_impl(impl, head_dim, interpret, fallback="chunked")

    if impl == "pallas":
        config, backward_config = _pallas_configs(block_size, q.shape, q.dtype)
        o, final_state = pallas_lightning_attention(q, k, v, slopes, initial_state=initial_state,
                                                    segment_ids=segment_ids, config=config,
                                                    backward_config=backward_config, interpret=interpret)
    elif impl == "naive":
        o, final_state = reference_lightning_attention(q, k, v, slopes, initial_state=initial_state,
                                                       segment_ids=segment_ids)
    else:
        o, final_state = chunked_lightning_attention(q, k, v, slopes, initial_state=initial_state,
                                                     segment_ids=segment_ids, block_size=block_size)
    return (o, final_state) if return_final_state else o


def lightning_decode(q, k, v, slopes, state, *, impl="auto", interpret=False):
    """One decode step: new_state = exp(-s) state + k^T v;  o = q @ new_state.

    Args:
      q, k, v: (B, H, D), one token per sequence, one dtype (float32 or bfloat16).
      slopes: (H,) float32, positive.
      state: (B, H, D, D) float32, the state after the previous token.
      impl: "auto" (the fused Pallas kernel on a GPU for up to DECODE_PALLAS_MAX_ROWS rows B*H, else the jnp
        step), "jnp" (jnp_decode.py), "pallas" (pallas_decode.py).
      interpret: run the Pallas kernel in interpret mode (CPU tests).
    Returns:
      (o (B, H, D) in q.dtype, new state (B, H, D, D) float32).
    """
    _check_qkv(q, k, v, 3, "(B, H, D)")
    batch, heads, head_dim = q.shape
    _check_slopes(slopes, heads)
    _check_state("state", state, batch, heads, head_dim)
    _check_impl(impl, DECODE_IMPLS)
    if impl == "auto" and batch * heads > DECODE_PALLAS_MAX_ROWS:
        impl = "jnp"  # XLA's fused jnp step streams large states at least as fast (notes_lightning.md)
    if _resolve_impl(impl, head_dim, interpret, fallback="jnp") == "pallas":
        return pallas_lightning_decode(q, k, v, slopes, state, interpret=interpret)
    return jnp_lightning_decode(q, k, v, slopes, state)
