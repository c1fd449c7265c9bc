"""Analytic FLOP counts of an M1-style model (a multiply-add counts 2), for MFU and the paper's FLOPs comparisons.

Per token of a length-T causal sequence (useful FLOPs only: the masked half of causal blocks is not counted):
  lightning layer: projections 2*hidden*(3HD) + 2*hidden*HD (gate) + 2*HD*hidden (out);
                   per head the recurrence's 2*D*D (state update k^T v) + 2*D*D (readout q S). The count is the
                   model's, not a kernel's: a blocked kernel's intra-block work depends on its block size, a
                   run-time choice (RunPolicy.block_size, which these counts do not take)
  softmax layer:   projections 2*hidden*(HD + 2KD) + 2*HD*hidden; per head 2*D*(T+1) (QK^T and PV over on average
                   (T+1)/2 keys)
  MoE:             router 2*hidden*E; k experts of 3 matmuls 2*hidden*F each
  lm_head:         2*hidden*V
Training counts forward + backward = 3x forward (rematerialisation is not model FLOPs).
"""
from __future__ import annotations

from m1jax.config import LIGHTNING, M1Config

# Dense bf16 tensor-core peak by the vendor's datasheet (SXM parts), used as the MFU denominator.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "B200": 2250e12}


def lightning_layer_flops(config: M1Config, tokens: int = 1) -> float:
    """Forward FLOPs of one lightning layer (attention part) for `tokens` tokens."""
    hd, d = config.num_heads * config.head_dim, config.head_dim
    projections = 2 * config.hidden_size * 3 * hd + 2 * config.hidden_size * hd + 2 * hd * config.hidden_size
    core = config.num_heads * 4 * d * d
    return float(tokens * (projections + core))


def softmax_layer_flops(config: M1Config, tokens: int = 1, context: int | None = None) -> float:
    """Forward FLOPs of one softmax attention layer for `tokens` new tokens after `context` cached ones (None:
    a fresh causal sequence of `tokens`)."""
    h, k, d = config.num_heads, config.num_kv_heads, config.head_dim
    projections = 2 * config.hidden_size * (h * d + 2 * k * d) + 2 * h * d * config.hidden_size
    if context is None:  # causal prefill: on average (T+1)/2 keys per query
        keys_total = tokens * (tokens + 1) / 2
    else:  # `tokens` queries appended after `context` cached keys
        keys_total = tokens * context + tokens * (tokens + 1) / 2
    return float(tokens * projections + 4 * h * d * keys_total)


def moe_flops(config: M1Config, tokens: int = 1) -> float:
    router = 2 * config.hidden_size * config.num_experts
    experts = config.experts_per_token * 3 * 2 * config.hidden_size * config.expert_size
    return float(tokens * (router + experts))


def forward_flops(config: M1Config, seq_len: int, batch: int = 1) -> float:
    """Model forward FLOPs for `batch` sequences of `seq_len` tokens (lm_head on every token)."""
    per_sequence = 0.0
    for kind in config.layer_types:
        attn = (lightning_layer_flops(config, seq_len) if kind == LIGHTNING
                else softmax_layer_flops(config, seq_len))
        per_sequence += attn + moe_flops(config, seq_len)
    per_sequence += 2.0 * config.hidden_size * config.vocab_size * seq_len
    return batch * per_sequence


def train_flops(config: M1Config, seq_len: int, batch: int = 1) -> float:
    """Forward + backward model FLOPs of one training step (3x forward)."""
    return 3.0 * forward_flops(config, seq_len, batch)


def decode_flops_per_token(config: M1Config, context: int) -> float:
    """FLOPs to generate one token after `context` tokens (lightning layers constant, softmax layers linear)."""
    total = 0.0
    hd, d = config.num_heads * config.head_dim, config.head_dim
    for kind in config.layer_types:
        if kind == LIGHTNING:
            projections = 2 * config.hidden_size * 3 * hd + 4 * config.hidden_size * hd
            total += projections + config.num_heads * 4 * d * d  # state update k^T v, then q S
        else:
            total += softmax_layer_flops(config, 1, context)
        total += moe_flops(config, 1)
    return total + 2.0 * config.hidden_size * config.vocab_size


def peak_flops_per_device(device_kind: str) -> float | None:
    """Datasheet dense bf16 peak for a jax device_kind string ("NVIDIA H100 80GB HBM3" -> H100), None if unknown."""
    for name, peak in PEAK_BF16_FLOPS.items():
        if name in device_kind.upper():
            return peak
    return None
