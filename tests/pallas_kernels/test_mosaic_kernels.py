"""The Mosaic GPU grouped-matmul kernels in Mosaic GPU's interpret mode (simulated warpgroups, barriers, TMA, with
its race detector) against the reference, and lowered for CUDA (no GPU needed) at M1's shapes.

Sizes are drawn with empty groups, one-row groups, groups inside one block and groups across many, so groups start
anywhere: the d_rhs's aligned row blocks hold other groups' rows (which it must zero), the forward's tiles start at
any row (8-aligned loads, stores of any row count). Padding rows past the last group hold NaN, so a row that
leaked would show; the row count is no multiple of the block. Several tiles per CTA (the persistent loop, the
epilogue's store buffers reused across tiles).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # get_races: no public name in jax 0.11
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.grouped_matmul import MosaicTiling, Tiling, grouped_matmul, grouped_matmul_reference
from pallas_kernels.grouped_matmul.mosaic_d_rhs import mosaic_transposed_grouped_matmul
from pallas_kernels.grouped_matmul.mosaic_grouped import mosaic_grouped_matmul

RACES = plgpu.InterpretGPUParams(detect_races=True)
K, N = 128, 256


def draw_case(rng, num_groups, block_rows, dtype=jnp.bfloat16):
    """(x (M, K), y (M, N), group_sizes): uneven sizes with empty and one-row groups, NaN padding rows,
    M % block_rows != 0."""
    kinds = rng.choice(["empty", "one", "small", "large"], size=num_groups, p=[0.2, 0.15, 0.35, 0.3])
    sizes = [{"empty": 0, "one": 1, "small": int(rng.integers(2, block_rows)),
              "large": int(rng.integers(block_rows, 3 * block_rows))}[kind] for kind in kinds]
    padding = int(rng.integers(1, block_rows))
    if (sum(sizes) + padding) % block_rows == 0:
        padding += 1
    rows = sum(sizes) + padding
    x = rng.standard_normal((rows, K)).astype(np.float32)
    y = rng.standard_normal((rows, N)).astype(np.float32)
    x[sum(sizes):], y[sum(sizes):] = np.nan, np.nan
    return jnp.asarray(x, dtype), jnp.asarray(y, dtype), jnp.asarray(sizes, jnp.int32)


def finite(a):
    return jnp.where(jnp.isnan(a), 0, a)


def assert_close_per_group(got, want, group_sizes):
    got = np.asarray(got, np.float64)
    assert not np.isnan(got).any()
    for e, size in enumerate(np.asarray(group_sizes)):
        scale = max(np.abs(want[e]).max(), 1.0)
        assert np.abs(got[e] - want[e]).max() <= 1e-2 * scale, (e, int(size), np.asarray(group_sizes).tolist())


@pytest.mark.parametrize("tiling, dtype, out_dtype", [
    (MosaicTiling(64, 64, 64, 2), jnp.bfloat16, jnp.bfloat16),
    (MosaicTiling(128, 128, 64, 3), jnp.bfloat16, jnp.bfloat16),
    (MosaicTiling(64, 128, 128, 2), jnp.float16, jnp.float32)],
    ids=["64x64x64-2stages-many-tiles", "128x128x64-3stages", "64x128x128-float16-to-float32"])
def test_d_rhs_matches_reference(rng, tiling, dtype, out_dtype):
    x, y, group_sizes = draw_case(rng, 6, tiling.block_k, dtype)
    got = mosaic_transposed_grouped_matmul(x, y, group_sizes, out_dtype=out_dtype, tiling=tiling, interpret=RACES)
    assert not interpret_pallas_call.get_races().races_found
    assert got.shape == (6, K, N) and got.dtype == out_dtype
    # The reference's d_rhs through autodiff of the masked-dense forward (which multiplies the padding by 0).
    _, pullback = jax.vjp(lambda w: grouped_matmul_reference(finite(x).astype(jnp.float32), w, group_sizes),
                          jnp.zeros((6, K, N), jnp.float32))
    assert_close_per_group(got, np.asarray(pullback(finite(y).astype(jnp.float32))[0], np.float64), group_sizes)


@pytest.mark.parametrize("tiling, transpose_w", [
    (MosaicTiling(64, 64, 64, 2), False), (MosaicTiling(128, 64, 64, 3), True), (MosaicTiling(64, 128, 128, 2), False)],
    ids=["64x64x64-forward-many-tiles", "128x64x64-d_lhs", "64x128x128-forward"])
def test_grouped_matches_reference(rng, tiling, transpose_w):
    x, _, group_sizes = draw_case(rng, 6, tiling.block_m)
    shape = (6, N, K) if transpose_w else (6, K, N)
    w = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    got = mosaic_grouped_matmul(x, w, group_sizes, transpose_w=transpose_w, tiling=tiling, interpret=RACES)
    assert not interpret_pallas_call.get_races().races_found
    assert got.shape == (x.shape[0], N) and got.dtype == jnp.bfloat16
    want = grouped_matmul_reference(x.astype(jnp.float32), jnp.swapaxes(w, 1, 2) if transpose_w else w, group_sizes)
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert not np.isnan(got).any() and (got[int(group_sizes.sum()):] == 0).all()  # NaN padding rows give zeros
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()


def test_grouped_fewer_rows_than_a_tile(rng):
    x = jnp.asarray(rng.standard_normal((21, K)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, K, N)), jnp.bfloat16)
    group_sizes = jnp.asarray([9, 0, 11], jnp.int32)
    got = mosaic_grouped_matmul(x, w, group_sizes, tiling=MosaicTiling(64, 64, 64, 2), interpret=True)
    want = grouped_matmul_reference(x, w, group_sizes)
    assert got.shape == (21, N)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=0.1, rtol=2e-2)


def test_mosaic_plan_in_the_grouped_matmul_vjp(rng):
    """A TilingPlan of MosaicTilings runs all three Mosaic kernels through grouped_matmul's VJP: equal to the Triton
    kernels' forward and gradients."""
    x, y, group_sizes = draw_case(rng, 4, 64)
    x, y = finite(x), finite(y)
    w = jnp.asarray(rng.standard_normal((4, K, N)), jnp.bfloat16)
    small = Tiling(block_m=32, block_n=64, block_k=32, num_warps=4, num_stages=2)
    results = {}
    for name, plan in (("triton", small), ("mosaic", MosaicTiling(64, 64, 64, 2))):
        out, pullback = jax.vjp(lambda a, b: grouped_matmul(a, b, group_sizes, impl="pallas", interpret=True,
                                                            tiling=plan), x, w)
        results[name] = [np.asarray(v, np.float64) for v in (out, *pullback(y))]
    for got, want in zip(results["mosaic"], results["triton"]):
        assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()


def test_mosaic_kernels_reject_what_they_cannot_run():
    x = jnp.zeros((8, 128), jnp.bfloat16)
    sizes = jnp.asarray([8], jnp.int32)
    with pytest.raises(ValueError, match="N = 192 is not a multiple of 256"):
        mosaic_transposed_grouped_matmul(x, jnp.zeros((8, 192), jnp.bfloat16), sizes, interpret=True)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        mosaic_transposed_grouped_matmul(x.astype(jnp.float32), jnp.zeros((8, 256), jnp.float32), sizes)
    with pytest.raises(ValueError, match="P = 320 is not a multiple of 256"):
        mosaic_grouped_matmul(x, jnp.zeros((1, 128, 320), jnp.bfloat16), sizes, interpret=True)
    with pytest.raises(ValueError, match="share Q"):
        mosaic_grouped_matmul(x, jnp.zeros((1, 256, 128), jnp.bfloat16), sizes, interpret=True)
    with pytest.raises(ValueError, match="must be 64, 128 or 256"):
        MosaicTiling(block_n=32)


# M1's expert matmul: 16384 rows, hidden 6144, expert width 9216, 32 experts.
M1 = dict(rows=jax.ShapeDtypeStruct((16384, 6144), jnp.bfloat16),
          wide=jax.ShapeDtypeStruct((16384, 9216), jnp.bfloat16),
          w=jax.ShapeDtypeStruct((32, 6144, 9216), jnp.bfloat16), sizes=jax.ShapeDtypeStruct((32,), jnp.int32))
KERNELS = {  # name: (function of (tiling, *operands), operands)
    "forward": (lambda t, x, w, g: mosaic_grouped_matmul(x, w, g, tiling=t, num_sms=132), ("rows", "w", "sizes")),
    "d_lhs": (lambda t, y, w, g: mosaic_grouped_matmul(y, w, g, transpose_w=True, tiling=t, num_sms=132),
              ("wide", "w", "sizes")),
    "d_rhs": (lambda t, x, y, g: mosaic_transposed_grouped_matmul(x, y, g, tiling=t, num_sms=132),
              ("rows", "wide", "sizes")),
}


def lower_for_cuda(kernel, tiling):
    """Lowering for CUDA needs no GPU, and checks what interpret mode does not: register layouts, TMA alignment
    and shared memory (the budget is the H100/H200's 227 KB)."""
    run, operands = KERNELS[kernel]
    return export.export(jax.jit(lambda *a: run(tiling, *a)), platforms=["cuda"])(
        *(M1[name] for name in operands)).mlir_module()


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("tiling", [MosaicTiling(), MosaicTiling(128, 64, 64, 4)], ids=["default", "narrow-n"])
def test_mosaic_kernels_lower_for_hopper(kernel, tiling):
    assert "mosaic_gpu" in lower_for_cuda(kernel, tiling)


def test_call_sites_of_one_shape_share_one_lowered_kernel():
    """A model calls each kernel at many sites with the same shapes (every MoE layer): they must lower once, or a
    training step's trace and lowering grow by ~0.5 s per call (the module by ~300 KB)."""
    run, operands = KERNELS["forward"]
    args = [M1[name] for name in operands]

    def lowered(sites):
        def f(x, w, g):
            for _ in range(sites):
                x = run(MosaicTiling(), x, w, g)[:, :x.shape[1]]
            return x
        return export.export(jax.jit(f), platforms=["cuda"])(*args).mlir_module()

    once, thrice = lowered(1), lowered(3)
    assert thrice.count("mosaic_gpu") == once.count("mosaic_gpu") > 0
    assert len(thrice) < 1.1 * len(once)


def test_too_many_stages_fail_to_lower():
    with pytest.raises(ValueError, match="exceeds available shared memory"):
        lower_for_cuda("forward", MosaicTiling(128, 128, 64, 4))
