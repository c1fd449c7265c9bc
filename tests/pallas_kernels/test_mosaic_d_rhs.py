"""The Mosaic GPU d_rhs (Mosaic GPU's interpret mode: simulated warpgroups, barriers, TMA) against the reference.

Groups start anywhere (the kernel's row blocks are aligned, so a group's first and last blocks hold other groups'
rows, which it must zero): sizes are drawn with empty groups, one-row groups, groups inside one block and groups
across many; padding rows past the last group hold NaN, so a masked row that leaked would show; the row count is
no multiple of the block, so the last block reads past M. Several tiles per CTA (the persistent loop, the epilogue's
alternating store slots) and the race detector on.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # get_races: no public name in jax 0.11
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.grouped_matmul import MosaicTiling, Tiling, TilingPlan, grouped_matmul, grouped_matmul_reference
from pallas_kernels.grouped_matmul.mosaic_d_rhs import mosaic_transposed_grouped_matmul


def reference_d_rhs(x, y, group_sizes, num_groups):
    """d_rhs through autodiff of the masked-dense reference: dW[e] = x_e^T y_e, in float64 on the host."""
    rhs = jnp.zeros((num_groups, x.shape[1], y.shape[1]), jnp.float32)
    _, pullback = jax.vjp(lambda w: grouped_matmul_reference(x.astype(jnp.float32), w, group_sizes), rhs)
    return np.asarray(pullback(y.astype(jnp.float32))[0], np.float64)


def draw_case(rng, num_groups, block_rows):
    """(x, y, group_sizes): uneven sizes with empty and one-row groups, NaN padding rows, M % block_rows != 0."""
    kinds = rng.choice(["empty", "one", "small", "large"], size=num_groups, p=[0.2, 0.15, 0.35, 0.3])
    sizes = [{"empty": 0, "one": 1, "small": int(rng.integers(2, block_rows)),
              "large": int(rng.integers(block_rows, 3 * block_rows))}[kind] for kind in kinds]
    padding = int(rng.integers(1, block_rows))
    if (sum(sizes) + padding) % block_rows == 0:
        padding += 1
    rows = sum(sizes) + padding
    x = rng.standard_normal((rows, 128)).astype(np.float32)
    y = rng.standard_normal((rows, 256)).astype(np.float32)
    x[sum(sizes):], y[sum(sizes):] = np.nan, np.nan
    return (jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16), jnp.asarray(sizes, jnp.int32))


@pytest.mark.parametrize("tiling, dtype, out_dtype", [
    (MosaicTiling(64, 64, 64, 2), jnp.bfloat16, jnp.bfloat16),
    (MosaicTiling(128, 128, 64, 3), jnp.bfloat16, jnp.bfloat16),
    (MosaicTiling(64, 128, 128, 2), jnp.float16, jnp.float32)],
    ids=["64x64x64-2stages-many-tiles", "128x128x64-3stages", "64x128x128-float16-to-float32"])
def test_mosaic_d_rhs_matches_reference(rng, tiling, dtype, out_dtype):
    x, y, group_sizes = draw_case(rng, num_groups=6, block_rows=tiling.block_rows)
    x, y = x.astype(dtype), y.astype(dtype)
    got = mosaic_transposed_grouped_matmul(x, y, group_sizes, out_dtype=out_dtype, tiling=tiling,
                                           interpret=plgpu.InterpretGPUParams(detect_races=True))
    assert not interpret_pallas_call.get_races().races_found
    assert got.shape == (6, 128, 256) and got.dtype == out_dtype
    clean = lambda a: jnp.where(jnp.isnan(a), 0, a)  # the reference multiplies the padding by 0: NaN would spread
    want = reference_d_rhs(clean(x), clean(y), group_sizes, 6)
    got = np.asarray(got, np.float64)
    for e, size in enumerate(np.asarray(group_sizes)):
        scale = max(np.abs(want[e]).max(), 1.0)
        assert np.abs(got[e] - want[e]).max() <= 1e-2 * scale, (e, int(size), np.asarray(group_sizes).tolist())
    assert not np.isnan(got).any()


def test_mosaic_d_rhs_in_the_grouped_matmul_vjp(rng):
    """TilingPlan(d_rhs=MosaicTiling) routes the VJP's d_rhs through the Mosaic kernel: equal to the Triton one's."""
    x, y, group_sizes = draw_case(rng, num_groups=4, block_rows=64)
    clean = lambda a: jnp.where(jnp.isnan(a), 0, a)
    x, y = clean(x), clean(y)
    w = jnp.asarray(rng.standard_normal((4, 128, 256)), jnp.bfloat16)
    small = Tiling(block_m=32, block_n=64, block_k=32, num_warps=4, num_stages=2)
    grads = {}
    for name, d_rhs in (("triton", small), ("mosaic", MosaicTiling(64, 64, 64, 2))):
        plan = TilingPlan(small, small, d_rhs)
        _, pullback = jax.vjp(lambda a, b: grouped_matmul(a, b, group_sizes, impl="pallas", interpret=True,
                                                          tiling=plan), x, w)
        grads[name] = [np.asarray(g, np.float64) for g in pullback(y)]
    np.testing.assert_array_equal(grads["mosaic"][0], grads["triton"][0])  # d_lhs: the same kernel
    scale = np.abs(grads["triton"][1]).max()
    assert np.abs(grads["mosaic"][1] - grads["triton"][1]).max() <= 1e-2 * scale


def test_mosaic_d_rhs_rejects_what_it_cannot_run():
    x = jnp.zeros((8, 128), jnp.bfloat16)
    sizes = jnp.asarray([8], jnp.int32)
    with pytest.raises(ValueError, match=r"N = 192 a multiple of 2 \* block_n = 256"):
        mosaic_transposed_grouped_matmul(x, jnp.zeros((8, 192), jnp.bfloat16), sizes, interpret=True)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        mosaic_transposed_grouped_matmul(x.astype(jnp.float32), jnp.zeros((8, 256), jnp.float32), sizes)
    with pytest.raises(ValueError, match="must be 64, 128 or 256"):
        MosaicTiling(block_k=32)


M1_SHAPES = (jax.ShapeDtypeStruct((16384, 6144), jnp.bfloat16), jax.ShapeDtypeStruct((16384, 9216), jnp.bfloat16),
             jax.ShapeDtypeStruct((32,), jnp.int32))  # M1's expert matmul: 16384 rows, 6144 x 9216, 32 experts


def lower_for_cuda(tiling):
    """Lowering for CUDA needs no GPU, and checks what interpret mode does not: register layouts and shared memory
    (the budget is the H100/H200's 227 KB)."""
    from jax import export
    run = jax.jit(lambda x, y, g: mosaic_transposed_grouped_matmul(x, y, g, tiling=tiling, num_sms=132))
    return export.export(run, platforms=["cuda"])(*M1_SHAPES).mlir_module()


@pytest.mark.parametrize("tiling", [MosaicTiling(), MosaicTiling(128, 64, 64, 4)], ids=["default", "narrow-n"])
def test_mosaic_d_rhs_lowers_for_hopper(tiling):
    assert "mosaic_gpu" in lower_for_cuda(tiling)


def test_mosaic_d_rhs_too_many_stages_fail_to_lower():
    with pytest.raises(ValueError, match="exceeds available shared memory"):
        lower_for_cuda(MosaicTiling(128, 128, 64, 6))
