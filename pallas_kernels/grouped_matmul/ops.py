"""The grouped matmul op: input checks, the custom VJP around the Pallas kernels, and dispatch."""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.grouped_matmul.kernel import Tiling, grouped_matmul_kernel, transposed_grouped_matmul_kernel
from pallas_kernels.grouped_matmul import mosaic_d_rhs, mosaic_grouped
from pallas_kernels.grouped_matmul.mosaic_common import MosaicTiling, divides
from pallas_kernels.grouped_matmul.reference import grouped_matmul_reference
from pallas_kernels.grouped_matmul.tiled import tiled_grouped_matmul

IMPLS = ("auto", "pallas", "tiled", "ragged_dot", "reference")
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


class TilingPlan(NamedTuple):
    """One tiling per kernel. Each names its own GEMM's tiles (see kernel.py): forward tiles (M, N, K),
    d_lhs tiles (M, K, N), d_rhs tiles (K, N, M). A Tiling runs the Triton kernels (kernel.py); a MosaicTiling the
    Mosaic GPU ones (mosaic_grouped.py, mosaic_d_rhs.py: Hopper, 16-bit inputs, K and N multiples of the tiles;
    default_tiling(..., hopper=True) picks them where they divide)."""

    forward: Tiling | MosaicTiling
    d_lhs: Tiling | MosaicTiling
    d_rhs: Tiling | MosaicTiling


# Best or within noise of the best in the sweeps on an H200 (benchmarks/RESULTS.md, "Grouped matmul").
# float32 runs Triton's ieee (CUDA core) dot; its tiles are smaller to fit registers, and were not tuned.
_DEFAULT_16BIT = TilingPlan(
    forward=Tiling(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
    d_lhs=Tiling(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
    d_rhs=Tiling(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
)
_DEFAULT_FLOAT32 = TilingPlan(*(Tiling(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=2),) * 3)
# Decode-sized calls (a few rows per group, e.g. batch-1 decode: 2 rows over 32 experts) leave 128-row tiles mostly
# empty and run only N / 256 programs per group: narrow tiles stream the weights 1.3-2.0x faster at hf-bench's up and
# down shapes with 2, 16 and 128 rows (benchmarks/grouped_matmul_decode.py, RESULTS.md "Grouped matmul at decode").
_SMALL_ROWS_16BIT = Tiling(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)
SMALL_ROWS_PER_GROUP = 16  # mean rows per group at or below which the narrow tiles are the default
# On a Hopper GPU, each kernel whose GEMM these tiles divide can run on Mosaic GPU: persistent, warp-specialised,
# its stores overlapping the next tile's loads, which Triton's tiles cannot. H200, 2026-12-01 (RESULTS.md, "Grouped
# matmul"): forward+backward 79-82% -> 83% of the dense einsum at M1's width, 77% -> 88% and 71% -> 83% at
# research-1b's up and down projections. Off by default (MOSAIC_BY_DEFAULT): in research-1b's training step
# (H200, 2026-12-02) they cut the grouped matmuls' time from 29.9 to 28.1 ms per step, but the step's time did not
# measurably move (145.6 ms both ways) and it compiled in 26 s instead of 15 (RESULTS.md, "The Mosaic kernels in
# research-1b's training step").
_MOSAIC_16BIT = MosaicTiling(block_m=128, block_n=128, block_k=64, stages=3)
MOSAIC_BY_DEFAULT = False  # True: a call with no tiling runs default_tiling's Mosaic choice on a Hopper GPU


def on_hopper() -> bool:
    """Whether the first device is a Hopper GPU (compute capability 9.0: WGMMA), where the Mosaic GPU kernels run."""
    device = jax.devices()[0]
    return device.platform == "gpu" and getattr(device, "compute_capability", None) == "9.0"


def default_tiling(dtype, rows: int | None = None, groups: int | None = None, k: int | None = None,
                   n: int | None = None, *, hopper: bool | None = None) -> TilingPlan:
    """The tiles used when none are given: by dtype, and for 16-bit inputs of at most SMALL_ROWS_PER_GROUP rows per
    group on average (rows = M of lhs, groups = E), narrow forward and d_lhs tiles (the backward's d_rhs keeps its
    own: its tiles run over K and N, not the rows). Given rhs's K and N on a Hopper GPU (hopper None: `on_hopper()`),
    the other 16-bit calls run each kernel whose GEMM _MOSAIC_16BIT divides on Mosaic GPU."""
    if jnp.dtype(dtype) == jnp.float32:
        return _DEFAULT_FLOAT32
    if rows is not None and groups is not None and rows <= SMALL_ROWS_PER_GROUP * groups:
        return _DEFAULT_16BIT._replace(forward=_SMALL_ROWS_16BIT, d_lhs=_SMALL_ROWS_16BIT)
    if k is None or n is None or not (on_hopper() if hopper is None else hopper):
        return _DEFAULT_16BIT
    gemms = {"forward": mosaic_grouped.required_multiples(k, n, _MOSAIC_16BIT),  # reduce over K, out N wide
             "d_lhs": mosaic_grouped.required_multiples(n, k, _MOSAIC_16BIT),  # reduce over N, out K wide
             "d_rhs": mosaic_d_rhs.required_multiples(k, n, _MOSAIC_16BIT)}
    return _DEFAULT_16BIT._replace(**{name: _MOSAIC_16BIT for name, sizes in gemms.items() if divides(sizes)})


def _as_plan(tiling, lhs, rhs, interpret: bool) -> TilingPlan:
    if tiling is None:  # interpret mode runs the Triton kernels' interpreter, whatever the machine
        hopper = None if MOSAIC_BY_DEFAULT and not interpret else False
        return default_tiling(lhs.dtype, lhs.shape[0], rhs.shape[0], *rhs.shape[1:], hopper=hopper)
    if isinstance(tiling, (Tiling, MosaicTiling)):
        return TilingPlan(tiling, tiling, tiling)
    if isinstance(tiling, TilingPlan):
        return tiling
    raise ValueError("tiling must be None, a Tiling, a MosaicTiling or a TilingPlan(forward, d_lhs, d_rhs), got "
                     f"{type(tiling).__name__}")


def _validate(lhs, rhs, group_sizes, impl):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if lhs.ndim != 2:
        raise ValueError(f"lhs must be (M, K), got shape {lhs.shape}")
    if rhs.ndim != 3:
        raise ValueError(f"rhs must be (E, K, N), got shape {rhs.shape}")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"lhs (M, K) and rhs (E, K, N) must share K: lhs {lhs.shape}, rhs {rhs.shape}")
    if rhs.shape[0] < 1:
        raise ValueError(f"rhs must hold at least one group (E >= 1), got shape {rhs.shape}")
    for name, array in (("lhs", lhs), ("rhs", rhs)):
        if array.dtype not in DTYPES:
            raise ValueError(f"{name} dtype must be bfloat16, float16 or float32, got {array.dtype}")
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"lhs and rhs must have the same dtype, got {lhs.dtype} and {rhs.dtype}; cast one")
    if group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"group_sizes must have shape (E,) = ({rhs.shape[0]},) to match rhs, got {group_sizes.shape}")
    if group_sizes.dtype != jnp.int32:
        raise ValueError(f"group_sizes must be int32, got {group_sizes.dtype}; use group_sizes.astype(jnp.int32)")
    if not isinstance(group_sizes, jax.core.Tracer):  # concrete sizes can be checked now
        sizes = np.asarray(group_sizes)
        if (sizes < 0).any() or sizes.sum() > lhs.shape[0]:
            raise ValueError(f"group_sizes must be >= 0 with sum <= M = {lhs.shape[0]}, got {sizes.tolist()}")


def _uses_pallas(impl: str, interpret: bool) -> bool:
    if impl == "auto":
        return interpret or jax.default_backend() == "gpu"
    if impl == "pallas" and not interpret and jax.default_backend() != "gpu":
        raise ValueError(f"impl='pallas' needs a GPU (backend is {jax.default_backend()!r}); "
                         "pass interpret=True to run the kernel in interpret mode, or use impl='auto'")
    return impl == "pallas"


def grouped_matmul(lhs, rhs, group_sizes, *, impl="auto", interpret=False, tiling=None):
    """Grouped matmul: out[r] = lhs[r] @ rhs[g(r)], rows sorted by group (group e owns rows
    [offset_e, offset_e + group_sizes[e])).

    Differentiable in lhs and rhs (custom_vjp: d_lhs = d_out @ rhs[g]^T grouped, d_rhs[e] = lhs_e^T d_out_e, a
    "transposed" grouped matmul; empty groups give zero d_rhs). float32 inputs are multiplied in full float32 (no
    TF32) by every impl.

    Args:
      lhs: (M, K) rows sorted by group.
      rhs: (E, K, N) one weight matrix per group.
      group_sizes: (E,) int32, sum <= M; rows past the sum are padding (output 0, zero gradient). Sizes of a traced
        group_sizes cannot be checked: the Pallas kernels clamp negative sizes to 0 and drop rows past M, other
        impls differ.
      impl: "auto" (Pallas on GPU, "tiled" elsewhere), "pallas", "tiled" (pure JAX: groups padded to whole row
        tiles, one batched matmul), "ragged_dot" (jax.lax.ragged_dot: E times the work on the CPU), "reference".
      interpret: run the Pallas kernels in interpret mode (any backend; "auto" then picks them too).
      tiling: None (`default_tiling` for the dtype and the rows per group; with MOSAIC_BY_DEFAULT also K, N and the
        GPU), a Tiling (Triton) or MosaicTiling (Mosaic GPU) for all three kernels, or a TilingPlan(forward, d_lhs,
        d_rhs).
    Returns:
      (M, N) in lhs.dtype, accumulated in float32.
    """
    _validate(lhs, rhs, group_sizes, impl)
    plan = _as_plan(tiling, lhs, rhs, interpret)
    if impl == "reference":
        return grouped_matmul_reference(lhs, rhs, group_sizes)
    if impl == "tiled" or (impl == "auto" and not _uses_pallas(impl, interpret)):
        return tiled_grouped_matmul(lhs, rhs, group_sizes)
    if not _uses_pallas(impl, interpret):
        precision = jax.lax.Precision.HIGHEST if lhs.dtype == jnp.float32 else None
        out = jax.lax.ragged_dot(lhs, rhs, group_sizes, precision=precision, preferred_element_type=jnp.float32)
        return out.astype(lhs.dtype)
    return _pallas_grouped_matmul(lhs, rhs, group_sizes, plan, bool(interpret))


def grouped_kernel(lhs, rhs, group_sizes, tiling, *, transpose_w=False, interpret=False):
    """The forward (or, transpose_w, d_lhs) kernel alone, no checks or VJP: Triton's for a Tiling, Mosaic GPU's for
    a MosaicTiling."""
    kernel = mosaic_grouped.mosaic_grouped_matmul if isinstance(tiling, MosaicTiling) else grouped_matmul_kernel
    return kernel(lhs, rhs, group_sizes, transpose_w=transpose_w, tiling=tiling, interpret=interpret)


def d_rhs_kernel(lhs, d_out, group_sizes, tiling, *, out_dtype, interpret=False):
    """The d_rhs kernel alone (d_rhs[e] = lhs_e^T d_out_e): Triton's for a Tiling, Mosaic GPU's for a MosaicTiling."""
    kernel = (mosaic_d_rhs.mosaic_transposed_grouped_matmul if isinstance(tiling, MosaicTiling)
              else transposed_grouped_matmul_kernel)
    return kernel(lhs, d_out, group_sizes, out_dtype=out_dtype, tiling=tiling, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _pallas_grouped_matmul(lhs, rhs, group_sizes, plan: TilingPlan, interpret: bool):
    return grouped_kernel(lhs, rhs, group_sizes, plan.forward, interpret=interpret)


def _forward(lhs, rhs, group_sizes, plan, interpret):
    return _pallas_grouped_matmul(lhs, rhs, group_sizes, plan, interpret), (lhs, rhs, group_sizes)


def _backward(plan, interpret, residuals, d_out):
    lhs, rhs, group_sizes = residuals
    d_out = d_out.astype(lhs.dtype)
    d_lhs = grouped_kernel(d_out, rhs, group_sizes, plan.d_lhs, transpose_w=True, interpret=interpret)
    d_rhs = d_rhs_kernel(lhs, d_out, group_sizes, plan.d_rhs, out_dtype=rhs.dtype, interpret=interpret)
    return d_lhs, d_rhs, np.zeros(group_sizes.shape, jax.dtypes.float0)


_pallas_grouped_matmul.defvjp(_forward, _backward)


def grouped_swiglu(lhs, gate, up, group_sizes, *, impl="auto", interpret=False, tiling=None):
    """An expert's SwiGLU input side: silu(lhs[r] @ gate[g(r)]) * (lhs[r] @ up[g(r)]), rows sorted by group.

    The same as two `grouped_matmul` calls and the element-wise product (its slow twin, and what it runs when
    differentiated, on impls other than Pallas, and for calls above SMALL_ROWS_PER_GROUP rows per group, where two
    accumulators of the large tiles would not fit the registers). Decode-sized Pallas calls run one kernel that
    reads each row once for both weights and writes only the product: one launch instead of three. The products
    are rounded to lhs's dtype before the combination, as two calls would store them.

    Args: lhs (M, K); gate, up (E, K, N); group_sizes (E,) int32; impl, interpret, tiling as in grouped_matmul.
    Returns: (M, N) in lhs.dtype.
    """
    _validate(lhs, gate, group_sizes, impl)
    _validate(lhs, up, group_sizes, impl)
    if up.shape != gate.shape:
        raise ValueError(f"gate and up must have the same shape (E, K, N), got {gate.shape} and {up.shape}")
    plan = _as_plan(tiling, lhs, gate, interpret)
    fused = (_uses_pallas(impl, interpret) and isinstance(plan.forward, Tiling) and plan.forward.split_k == 1
             and lhs.shape[0] <= SMALL_ROWS_PER_GROUP * gate.shape[0])
    if not fused:
        return _two_calls(lhs, gate, up, group_sizes, impl, interpret, tiling)
    return _fused_swiglu(lhs, gate, up, group_sizes, plan, bool(interpret), impl, tiling)


def _two_calls(lhs, gate, up, group_sizes, impl, interpret, tiling):
    def call(rhs):
        return grouped_matmul(lhs, rhs, group_sizes, impl=impl, interpret=interpret, tiling=tiling)
    return jax.nn.silu(call(gate)) * call(up)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused_swiglu(lhs, gate, up, group_sizes, plan, interpret, impl, tiling):
    return grouped_matmul_kernel(lhs, gate, group_sizes, transpose_w=False, tiling=plan.forward, interpret=interpret,
                                 up=up)


def _fused_forward(lhs, gate, up, group_sizes, plan, interpret, impl, tiling):
    """Differentiated: the two calls (their outputs are the backward's residuals), not the fused kernel."""
    out, pullback = jax.vjp(lambda lhs, gate, up: _two_calls(lhs, gate, up, group_sizes, impl, interpret, tiling),
                            lhs, gate, up)
    return out, (pullback, group_sizes)


def _fused_backward(plan, interpret, impl, tiling, residuals, d_out):
    pullback, group_sizes = residuals
    return (*pullback(d_out), np.zeros(group_sizes.shape, jax.dtypes.float0))


_fused_swiglu.defvjp(_fused_forward, _fused_backward)

__all__ = ["grouped_matmul", "grouped_swiglu", "Tiling", "TilingPlan", "default_tiling", "IMPLS"]
