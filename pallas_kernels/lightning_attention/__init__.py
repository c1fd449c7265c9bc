"""Lightning attention (MiniMax-M1's linear attention with per-head exponential decay)."""
from pallas_kernels.lightning_attention.ops import lightning_attention, lightning_decode

__all__ = ["lightning_attention", "lightning_decode"]
