"""The one map between Hugging Face tensor names (the released checkpoint's original naming) and m1jax parameters.

Every HF tensor is one slice of one m1jax leaf: layer l lives at group g = l // p, position j = l % p (p the layer
period) of the stacked `groups` parameters, and expert e of a layer at index [g, e] of the stacked expert weights.
HF linear weights are (out, in); ours are (in, out): those entries are transposed.
transformers' in-memory naming packs experts (`mlp.experts.gate_up_proj` (E, 2F, hidden), `mlp.experts.down_proj`
(E, hidden, F), `mlp.gate.weight`); `packed_source` says where an original expert tensor sits in those.
"""
from __future__ import annotations

import dataclasses
import re

from m1jax.config import LIGHTNING, M1Config

# Buffers transformers writes beside the weights; they are derived from the config (slopes and decays), not weights.
DERIVED_BUFFERS = re.compile(r"model\.layers\.\d+\.self_attn\.(slope_rate|query_decay|key_decay|diagonal_decay)$")

_LIGHTNING_ATTN = {"qkv_proj": ("qkv_proj", "kernel"), "output_gate": ("output_gate", "kernel"),
                   "out_proj": ("out_proj", "kernel"), "norm": ("norm", "scale")}
_SOFTMAX_ATTN = {name: (name, "kernel") for name in ("q_proj", "k_proj", "v_proj", "o_proj")}


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """HF tensor `name` is `params[path][index]`, transposed when `transpose`."""
    name: str
    path: tuple[str, ...]
    index: tuple[int, ...]
    transpose: bool


def tensor_maps(config: M1Config) -> list[TensorMap]:
    """All HF tensors of a model with this config, in checkpoint order (8,243 for MiniMax-M1)."""
    maps = [TensorMap("model.embed_tokens.weight", ("embed", "embedding"), (), False)]
    period = config.layer_period
    for layer, kind in enumerate(config.layer_types):
        g, j = divmod(layer, period)
        prefix, base = f"model.layers.{layer}.", ("groups", f"layer_{j}")
        maps.append(TensorMap(prefix + "input_layernorm.weight", base + ("input_norm", "scale"), (g,), False))
        attn = _LIGHTNING_ATTN if kind == LIGHTNING else _SOFTMAX_ATTN
        for hf_name, ours in attn.items():
            maps.append(TensorMap(f"{prefix}self_attn.{hf_name}.weight", base + ("attn",) + ours, (g,),
                                  ours[-1] == "kernel"))
        maps.append(TensorMap(prefix + "post_attention_layernorm.weight", base + ("post_attn_norm", "scale"), (g,),
                              False))
        maps.append(TensorMap(prefix + "block_sparse_moe.gate.weight", base + ("moe", "gate"), (g,), True))
        for e in range(config.num_experts):
            for w in ("w1", "w3", "w2"):
                maps.append(TensorMap(f"{prefix}block_sparse_moe.experts.{e}.{w}.weight", base + ("moe", w),
                                      (g, e), True))
    maps.append(TensorMap("model.norm.weight", ("final_norm", "scale"), (), False))
    maps.append(TensorMap("lm_head.weight", ("lm_head", "kernel"), (), True))
    return maps


_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_GATE = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight$")


def packed_source(name: str, expert_size: int) -> tuple[str, tuple] | None:
    """Where an original-named MoE tensor sits in transformers' packed naming: (packed name, index into it)."""
    if m := _GATE.match(name):
        return f"model.layers.{m[1]}.mlp.gate.weight", ()
    if m := _EXPERT.match(name):
        layer, e, w = m[1], int(m[2]), m[3]
        if w == "w2":
            return f"model.layers.{layer}.mlp.experts.down_proj", (e,)
        rows = slice(0, expert_size) if w == "w1" else slice(expert_size, 2 * expert_size)
        return f"model.layers.{layer}.mlp.experts.gate_up_proj", (e, rows)
    return None
