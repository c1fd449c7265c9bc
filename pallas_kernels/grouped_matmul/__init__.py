"""Grouped matmul for the MoE layer: rows sorted by expert times each expert's weights.

`grouped_matmul` is the op (Pallas kernels on GPU with a custom VJP, a tiled pure-JAX path elsewhere);
`grouped_matmul_reference` is its obviously-correct twin. `grouped_swiglu` is an expert's gate and up matmuls and
their SwiGLU product (one kernel for decode-sized calls). A `MosaicTiling` (or one in a TilingPlan) selects the Mosaic
GPU kernels (mosaic_grouped.py, mosaic_d_rhs.py).
"""
from pallas_kernels.grouped_matmul.kernel import Tiling
from pallas_kernels.grouped_matmul.mosaic_common import MosaicTiling
from pallas_kernels.grouped_matmul.ops import IMPLS, TilingPlan, default_tiling, grouped_matmul, grouped_swiglu
from pallas_kernels.grouped_matmul.reference import grouped_matmul_reference

__all__ = ["grouped_matmul", "grouped_swiglu", "grouped_matmul_reference", "Tiling", "TilingPlan", "MosaicTiling",
           "default_tiling", "IMPLS"]
