"""What the Mosaic GPU grouped-matmul kernels share: their tiling, shared-memory layouts and launch.

Both kernels (mosaic_grouped.py: forward and d_lhs; mosaic_d_rhs.py: d_rhs) run one CTA per SM over a list of
output tiles, three warpgroups each: warpgroup 2 issues the TMA loads of a warp-specialised pipeline (running
ahead into the next tile while the others store the last), warpgroups 0 and 1 each own half of the tile's columns
(a block_m x block_n float32 accumulator, WGMMA) and store it through shared memory with TMA.

Both entry points are jitted, so the call sites of one shape share one trace and one lowered kernel. Unshared,
each call site lowered its own ~300 KB copy, and research-1b's training step (9 calls per MoE layer) took 31 s to
trace and 70 s to lower to MLIR on an H200 (benchmarks/RESULTS.md, 2026-12-01).
"""
import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

EPILOGUE = 64  # 64 16-bit elements fill a swizzled 128-byte row: a shared-memory tile's width; d_rhs's store piece
COMPUTE_WARPGROUPS = 2


@dataclasses.dataclass(frozen=True)
class MosaicTiling:
    """Tiles of a Mosaic GPU kernel, named after that kernel's own GEMM as `Tiling` is (forward (M, N, K), d_lhs
    (M, K, N), d_rhs (K, N, M)): the output tile is block_m x (2 block_n), each compute warpgroup block_m x block_n;
    the reduction runs in steps of block_k, `stages` steps in flight. Shared memory (227 KB on H100 and H200):
    stages x block_k x (block_m + 2 block_n) inputs plus each kernel's store buffers; a tiling that does not fit
    fails to lower, naming the bytes."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value not in (64, 128, 256):
                raise ValueError(f"MosaicTiling.{name} must be 64, 128 or 256 (WGMMA and 128-byte swizzled TMA "
                                 f"tiles), got {value!r}")
        if not 2 <= self.stages <= 8:
            raise ValueError(f"MosaicTiling.stages must be in 2..8, got {self.stages!r}")


def swizzled(dtype):
    """Shared-memory transforms of a TMA/WGMMA operand: 8-row x 128-byte tiles, 128-byte swizzle."""
    swizzle = plgpu.find_swizzle(EPILOGUE * 16)  # 64 16-bit elements: 128 bytes
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


def check_operands(a, b, what_a, what_b):
    if a.dtype != b.dtype or a.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"{what_a} and {what_b} must both be bfloat16 or float16 (WGMMA), got {a.dtype} and "
                         f"{b.dtype}; use the Triton kernels (kernel.py) for float32")


def divides(sizes: dict) -> bool:
    """sizes: {"K = 6144": (6144, 128), ...}: whether each size is a multiple of its tile."""
    return not any(size % tile for size, tile in sizes.values())


def check_divides(sizes: dict, tiling: MosaicTiling):
    """sizes as in `divides`: raise, naming each size that is not a multiple of its tile."""
    bad = [f"{name} is not a multiple of {tile}" for name, (size, tile) in sizes.items() if size % tile]
    if bad:
        raise ValueError(f"{'; '.join(bad)}: pick a MosaicTiling that divides them ({tiling}), or use the Triton "
                         "kernels (kernel.py)")


def launch(body, out_type, num_sms, interpret):
    """A persistent kernel: `num_sms` CTAs on grid axis "sm", 3 warpgroups on axis "wg" (2 compute, 1 memory).
    interpret: False, True or a plgpu.InterpretGPUParams (e.g. detect_races=True): Mosaic GPU's interpret mode."""
    if num_sms is None:
        num_sms = 3 if interpret else jax.devices()[0].core_count
    if interpret is True:
        interpret = plgpu.InterpretGPUParams()
    return plgpu.kernel(
        body, out_type=out_type, grid=(num_sms,), grid_names=("sm",), num_threads=COMPUTE_WARPGROUPS + 1,
        thread_name="wg", compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret)
