"""d_rhs of the grouped matmul as a Mosaic GPU kernel (Hopper): persistent, warp-specialised, TMA loads and stores.

    dW[e] = x_e^T @ y_e        x (M, K), y (M, N) rows sorted by group; dW (E, K, N); group e owns rows
                               [start_e, end_e); rows past the last group (padding) are read by no group.

Why a second d_rhs. The Triton kernel (kernel.py, `transposed_grouped_matmul_kernel`) runs one program per output
tile; at M1's width each tile reduces only its expert's ~512 rows (8 steps), so every tile's pipeline fill and
its 64 KB store sit on the critical path: 458 TFLOP/s against 565 for the forward (benchmarks/RESULTS.md). Triton
offers no warp-specialised epilogue, and a persistent loop does not pipeline through Pallas-Triton
(notes_grouped_matmul.md). Here one CTA per SM walks its share of the (group, K tile, N tile) list:

    memory warpgroup     TMA-loads (rows x K) blocks of x and (rows x N) blocks of y for the tile, running ahead of
                         the compute by `stages` blocks, and on into the next tile while the epilogue stores
    2 compute warpgroups each owns half of the tile's N columns: zero the rows outside the group in its half of
                         the first and last block (groups start anywhere; blocks of block_k rows are aligned),
                         WGMMA x_blk^T @ y_blk into a float32 (block_m, block_n) register accumulator, then store
                         it through shared memory with TMA, two (64 x 64) slots in flight

Cost: reads each group's rows once per (K tile, N tile) pair, as the Triton kernel does; writes dW once. Work per
tile: 2 * block_m * 2 block_n * rows_e FLOPs. A group's first and last blocks are partly another group's rows
(masked): at most 2 * block_k extra rows per group. Shared memory: the pipeline's stages plus 4 x 64 x 64 of dW.

Status: tested against the reference in Mosaic GPU's interpret mode on the CPU, with its race detector, and lowered
for CUDA (layouts, shared memory) at M1's shapes (tests/pallas_kernels/test_mosaic_kernels.py). On an H200 it
equals the Triton d_rhs and runs 1.00-1.14x faster (benchmarks/RESULTS.md); used when asked,
`TilingPlan(forward, d_lhs, MosaicTiling(...))`, or by default with ops.MOSAIC_BY_DEFAULT.
`benchmarks/grouped_matmul.py --candidates 128x256x64/8/3,mosaic:128x128x64/3` times it against the Triton d_rhs.
Tiles follow this GEMM (K, N, M), as kernel.py's do: block_m of K, block_n of N per warpgroup, block_k rows.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.grouped_matmul.kernel import group_bounds
from pallas_kernels.grouped_matmul.mosaic_common import (COMPUTE_WARPGROUPS, EPILOGUE, MosaicTiling, check_divides,
                                                         check_operands, launch, swizzled)


def required_multiples(k: int, n: int, tiling: MosaicTiling) -> dict:
    """{name: (size, the tile it must be a multiple of)} for dW of shape (E, K, N)."""
    return {f"K = {k}": (k, tiling.block_m), f"N = {n}": (n, 2 * tiling.block_n)}


# jitted: call sites of one shape share one lowered kernel (mosaic_common's docstring says why)
@functools.partial(jax.jit, static_argnames=("out_dtype", "tiling", "num_sms", "interpret"))
def mosaic_transposed_grouped_matmul(x, y, group_sizes, *, out_dtype=None, tiling=MosaicTiling(), num_sms=None,
                                     interpret=False):
    """dW[e] = x_e^T @ y_e, float32 accumulation.

    Args:
      x: (M, K) rows sorted by group; y: (M, N) the same rows; bfloat16 or float16.
      group_sizes: (E,) int32, sum <= M (negative sizes count as 0; rows past M are dropped).
      out_dtype: dW's dtype (default x.dtype). tiling: MosaicTiling of this GEMM (K, N, M): block_m divides K,
        2 block_n divides N, block_k rows a step.
      num_sms: CTAs of the persistent grid (default: the device's SM count; in interpret mode 3).
      interpret: run in Mosaic GPU's interpret mode (any backend; simulated threads, barriers and TMA): True, or
        a `plgpu.InterpretGPUParams` (e.g. detect_races=True).
    Returns:
      (E, K, N) in out_dtype; an empty group's matrix is zeros.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x (M, K) and y (M, N) must share M, got {x.shape} and {y.shape}")
    if group_sizes.ndim != 1 or group_sizes.dtype != jnp.int32:
        raise ValueError(f"group_sizes must be (E,) int32, got {group_sizes.shape} {group_sizes.dtype}")
    check_operands(x, y, "x", "y")
    num_rows, k = x.shape
    n = y.shape[1]
    check_divides(required_multiples(k, n, tiling), tiling)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    groups = group_sizes.shape[0]
    bk, bn, br = tiling.block_m, tiling.block_n, tiling.block_k  # K tile, N tile per warpgroup, rows a step
    starts, ends = group_bounds(group_sizes, num_rows)
    first_block = starts // br
    num_blocks = jnp.where(ends > starts, -(-ends // br) - first_block, 0).astype(jnp.int32)
    bounds = jnp.stack([starts, ends, first_block, num_blocks])  # (4, E) int32, read per tile from GMEM

    transforms, out_transforms = swizzled(x.dtype), swizzled(out_dtype)
    k_tiles, n_tiles = k // bk, n // (2 * bn)
    pieces = [(i, j) for i in range(bk // EPILOGUE) for j in range(bn // EPILOGUE)]

    def body(bounds_gmem, x_gmem, y_gmem, out_gmem):
        def pipeline(step_body, compute_context, num_steps, first):
            return plgpu.emit_pipeline_warp_specialized(
                step_body, grid=(num_steps,), memory_registers=40, wg_axis="wg", num_compute_wgs=COMPUTE_WARPGROUPS,
                max_concurrent_steps=tiling.stages, compute_context=compute_context,
                in_specs=[plgpu.BlockSpec((br, bk), lambda r: (first + r, 0), transforms=transforms),
                          plgpu.BlockSpec((br, 2 * bn), lambda r: (first + r, 0), transforms=transforms)])

        ignore = lambda *_, **__: None
        allocations = pipeline(ignore, ignore, tiling.stages, 0).get_allocations(x_gmem.at[:, pl.ds(0, bk)],
                                                                      y_gmem.at[:, pl.ds(0, 2 * bn)])

        @functools.partial(pl.run_scoped, allocations=allocations,
                           out_smem=plgpu.SMEM((COMPUTE_WARPGROUPS, 2, EPILOGUE, EPILOGUE), out_dtype,
                                               transforms=out_transforms),
                           masked=plgpu.Barrier(num_arrivals=2), collective_axes="wg")
        def scope(allocations, out_smem, masked):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((groups * k_tiles * n_tiles,), collective_axes="sm")
            def tiles(loop_info):
                (index,) = loop_info.index
                group, rest = index // (k_tiles * n_tiles), index % (k_tiles * n_tiles)
                k_tile, n_tile = rest // n_tiles, rest % n_tiles
                start, end = bounds_gmem[0, group], bounds_gmem[1, group]
                first, num_steps = bounds_gmem[2, group], bounds_gmem[3, group]
                cols = pl.ds(wg * bn, bn)  # this warpgroup's half of the tile's N columns

                def store(acc):
                    for piece, (i, j) in enumerate(pieces):  # slots alternate across pieces and tiles
                        slot = lax.rem(loop_info.local_index * len(pieces) + piece, 2)
                        plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the slot's previous store has read it
                        out_smem[wg, slot] = acc[i * EPILOGUE:(i + 1) * EPILOGUE,
                                                 j * EPILOGUE:(j + 1) * EPILOGUE]
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(
                            out_smem.at[wg, slot],
                            out_gmem.at[group, pl.ds(k_tile * bk + i * EPILOGUE, EPILOGUE),
                                        pl.ds(n_tile * 2 * bn + wg * bn + j * EPILOGUE, EPILOGUE)])

                def compute_context(run):
                    @functools.partial(pl.run_scoped, acc=plgpu.ACC((bk, bn), jnp.float32))
                    def _(acc):
                        run(acc)
                        store(acc[...].astype(out_dtype))

                def step(indices, x_smem, y_smem, acc):
                    (r,) = indices
                    own = y_smem.at[:, cols]

                    @pl.when((r == 0) | (r == num_steps - 1))
                    def _():  # the group's first or last block: zero the rows of other groups (or padding) in
                        # both operands (y alone would leave 0 * inf = NaN); warpgroup 0 also zeroes x's, shared
                        def zero_other_rows(ref, width):
                            rows = (first + r) * br + plgpu.layout_cast(
                                lax.broadcasted_iota(jnp.int32, (br, width), 0), plgpu.Layout.WGMMA)
                            ref[...] = jnp.where((rows >= start) & (rows < end), ref[...], jnp.zeros_like(ref[...]))

                        zero_other_rows(own, bn)
                        pl.when(wg == 0)(lambda: zero_other_rows(x_smem, bk))
                        plgpu.commit_smem()
                        plgpu.barrier_arrive(masked)  # both halves and x are zeroed before either WGMMA reads
                        plgpu.barrier_wait(masked)

                    plgpu.wgmma(acc, x_smem.transpose((1, 0)), own)
                    plgpu.wgmma_wait(0)  # done reading this step's buffers, which the pipeline then releases
                    return acc

                @pl.when(num_steps > 0)
                def _():
                    pipeline(step, compute_context, num_steps, first)(
                        x_gmem.at[:, pl.ds(k_tile * bk, bk)], y_gmem.at[:, pl.ds(n_tile * 2 * bn, 2 * bn)],
                        allocations=allocations)

                @pl.when((num_steps == 0) & (wg < COMPUTE_WARPGROUPS))
                def _():  # an empty group: zeros
                    store(jnp.zeros((bk, bn), out_dtype))

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = launch(body, jax.ShapeDtypeStruct((groups, k, n), out_dtype), num_sms, interpret)
    return kernel(bounds, x, y)
