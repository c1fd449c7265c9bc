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
                         the first and last block (groups start anywhere; blocks are aligned to `block_rows`),
                         WGMMA x_blk^T @ y_blk into a float32 (block_k, block_n) register accumulator, then store
                         it through shared memory with TMA, two (64 x 64) slots in flight

Cost: reads each group's rows once per (K tile, N tile) pair, as the Triton kernel does; writes dW once. Work per
tile: 2 * block_k * 2 block_n * rows_e FLOPs. A group's first and last blocks are partly another group's rows
(masked): at most 2 * block_rows extra rows per group.

Status: tested against the reference in Mosaic GPU's interpret mode on the CPU, with its race detector, and lowered
for CUDA (layouts, shared memory) at M1's shapes (tests/pallas_kernels/test_mosaic_d_rhs.py); not yet run or timed
on a GPU, so the grouped matmul's VJP uses it only when asked: `TilingPlan(forward, d_lhs, MosaicTiling(...))`.
`benchmarks/grouped_matmul.py --candidates 128x256x64/8/3,mosaic:128x128x64/4` times it against the Triton d_rhs.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

_EPILOGUE = 64  # the epilogue stores 64 x 64 pieces of a warpgroup's accumulator


@dataclasses.dataclass(frozen=True)
class MosaicTiling:
    """The output tile is block_k x (2 block_n) of dW[e] (each compute warpgroup block_k x block_n); the reduction
    runs over the group's rows in steps of block_rows, `stages` steps in flight. Shared memory (227 KB on H100 and
    H200): stages x (block_rows x (block_k + 2 block_n)) inputs plus 4 x 64 x 64 outputs; the default fits with a
    16-bit dW, a float32 dW needs stages=3 (a tiling that does not fit fails to lower, naming the bytes)."""

    block_k: int = 128
    block_n: int = 128
    block_rows: int = 64
    stages: int = 4

    def __post_init__(self):
        for name in ("block_k", "block_n", "block_rows"):
            value = getattr(self, name)
            if value not in (64, 128, 256):
                raise ValueError(f"MosaicTiling.{name} must be 64, 128 or 256 (WGMMA and 128-byte swizzled TMA "
                                 f"tiles), got {value!r}")
        if not 2 <= self.stages <= 8:
            raise ValueError(f"MosaicTiling.stages must be in 2..8, got {self.stages!r}")


def _check(x, y, group_sizes, tiling):
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x (M, K) and y (M, N) must share M, got {x.shape} and {y.shape}")
    if x.dtype != y.dtype or x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"x and y must both be bfloat16 or float16 (WGMMA), got {x.dtype} and {y.dtype}")
    if group_sizes.ndim != 1 or group_sizes.dtype != jnp.int32:
        raise ValueError(f"group_sizes must be (E,) int32, got {group_sizes.shape} {group_sizes.dtype}")
    _, k = x.shape
    n = y.shape[1]
    if k % tiling.block_k or n % (2 * tiling.block_n):
        raise ValueError(f"K = {k} must be a multiple of block_k = {tiling.block_k} and N = {n} a multiple of "
                         f"2 * block_n = {2 * tiling.block_n}: pick a MosaicTiling that divides them (or use the "
                         "Triton kernel, kernel.py)")


def mosaic_transposed_grouped_matmul(x, y, group_sizes, *, out_dtype=None, tiling=MosaicTiling(), num_sms=None,
                                     interpret=False):
    """dW[e] = x_e^T @ y_e, float32 accumulation.

    Args:
      x: (M, K) rows sorted by group; y: (M, N) the same rows; bfloat16 or float16.
      group_sizes: (E,) int32, sum <= M (negative sizes count as 0; rows past M are dropped).
      out_dtype: dW's dtype (default x.dtype). tiling: MosaicTiling; K and N must be multiples of its tiles.
      num_sms: CTAs of the persistent grid (default: the device's SM count; in interpret mode 3).
      interpret: run in Mosaic GPU's interpret mode (any backend; simulated threads, barriers and TMA): True, or
        a `plgpu.InterpretGPUParams` (e.g. detect_races=True).
    Returns:
      (E, K, N) in out_dtype; an empty group's matrix is zeros.
    """
    _check(x, y, group_sizes, tiling)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    num_rows, k = x.shape
    n = y.shape[1]
    groups = group_sizes.shape[0]
    bk, bn, br = tiling.block_k, tiling.block_n, tiling.block_rows
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes, 0)), num_rows).astype(jnp.int32)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    first_block = starts // br
    num_blocks = jnp.where(ends > starts, -(-ends // br) - first_block, 0).astype(jnp.int32)
    bounds = jnp.stack([starts, ends, first_block, num_blocks])  # (4, E) int32, read per tile from GMEM

    swizzle = plgpu.find_swizzle(_EPILOGUE * x.dtype.itemsize * 8)  # 64 elements a row: the 128-byte swizzle
    elems = swizzle // x.dtype.itemsize
    transforms = (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))
    out_swizzle = plgpu.find_swizzle(_EPILOGUE * out_dtype.itemsize * 8)
    out_transforms = (plgpu.TilingTransform((8, out_swizzle // out_dtype.itemsize)),
                      plgpu.SwizzleTransform(out_swizzle))
    k_tiles, n_tiles = k // bk, n // (2 * bn)
    pieces = [(i, j) for i in range(bk // _EPILOGUE) for j in range(bn // _EPILOGUE)]

    def body(bounds_gmem, x_gmem, y_gmem, out_gmem):
        def pipeline(step_body, compute_context, num_steps, first):
            return plgpu.emit_pipeline_warp_specialized(
                step_body, grid=(num_steps,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
                max_concurrent_steps=tiling.stages, compute_context=compute_context,
                in_specs=[plgpu.BlockSpec((br, bk), lambda r: (first + r, 0), transforms=transforms),
                          plgpu.BlockSpec((br, 2 * bn), lambda r: (first + r, 0), transforms=transforms)])

        ignore = lambda *_, **__: None
        allocations = pipeline(ignore, ignore, tiling.stages, 0).get_allocations(x_gmem.at[:, pl.ds(0, bk)],
                                                                      y_gmem.at[:, pl.ds(0, 2 * bn)])

        @functools.partial(pl.run_scoped, allocations=allocations,
                           out_smem=plgpu.SMEM((2, 2, _EPILOGUE, _EPILOGUE), out_dtype, transforms=out_transforms),
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
                        out_smem[wg, slot] = acc[i * _EPILOGUE:(i + 1) * _EPILOGUE,
                                                 j * _EPILOGUE:(j + 1) * _EPILOGUE]
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(
                            out_smem.at[wg, slot],
                            out_gmem.at[group, pl.ds(k_tile * bk + i * _EPILOGUE, _EPILOGUE),
                                        pl.ds(n_tile * 2 * bn + wg * bn + j * _EPILOGUE, _EPILOGUE)])

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

                @pl.when((num_steps == 0) & (wg < 2))
                def _():  # an empty group: zeros
                    store(jnp.zeros((bk, bn), out_dtype))

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    if num_sms is None:
        num_sms = 3 if interpret else jax.devices()[0].core_count
    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((groups, k, n), out_dtype), grid=(num_sms,), grid_names=("sm",),
        num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=(interpret if isinstance(interpret, plgpu.InterpretGPUParams)
                   else plgpu.InterpretGPUParams() if interpret else False))
    return kernel(bounds, x, y)
