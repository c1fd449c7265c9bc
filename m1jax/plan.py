"""Per-device memory of a training or inference run on a mesh, from abstract shapes and the real sharding rules.

Nothing is allocated: parameters are sharded on a jax.sharding.AbstractMesh with m1jax.sharding's rules, so a plan
for 128 H100s runs on a laptop. Weights, gradients and optimizer moments are exact (shard shapes times dtype
sizes); activations are an estimate, per token and layer, of what the backward pass keeps (stated below).

Activation estimate (bytes per token per layer, compute dtype c, no rematerialisation):
  residual stream and the two norms' inputs   4 * hidden
  lightning layer                             10 * H*D   (qkv before/after SiLU, output, its norm, gate)
  softmax layer                               2 * H*D + 2 * K*D (+ flash attention's log-sum-exp)
  MoE                                         k * (2 * hidden + 3 * F)   (dispatched rows, w1/w3 outputs, product)
With remat="full" only each layer group's input is kept, plus one group's activations during its backward;
"dots" keeps matmul outputs (estimated as 60% of the no-remat figure). Logits: float32 (B, T, V) and their gradient.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AbstractMesh

from m1jax.config import LIGHTNING, M1Config
from m1jax.model import abstract_params

GIB = 2 ** 30
DEVICE_MEMORY_GIB = {"H100": 80, "H200": 141}


def _bytes(dtype: str) -> int:
    return np.dtype(jax.numpy.dtype(dtype)).itemsize


def _abstract_mesh(axes: dict[str, int]):
    from m1jax.sharding import MESH_AXES
    unknown = sorted(set(axes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"--mesh names unknown axes {unknown}; use {MESH_AXES}")
    sizes = tuple(int(axes.get(name, 1)) for name in MESH_AXES)
    return AbstractMesh(sizes, MESH_AXES)


def plan(config: M1Config, mesh_axes: dict[str, int], *, batch_size: int, seq_len: int, remat: str = "full",
         training: bool = True) -> dict[str, float]:
    """Per-device bytes by component, plus "devices" and "total"."""
    from m1jax.sharding import BATCH_AXES, check_mesh, param_shardings
    mesh = _abstract_mesh(mesh_axes)
    check_mesh(mesh, num_experts=config.num_experts, batch_size=batch_size)
    abstract = abstract_params(config)
    shardings = param_shardings(abstract, mesh)
    elements = sum(math.prod(s.shard_shape(a.shape)) for a, s in
                   zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))
    batch_shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    local_tokens = batch_size // batch_shards * seq_len
    c = _bytes(config.compute_dtype)
    hd, kd = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    vocab_shards = mesh.shape["tensor"] if config.vocab_size % mesh.shape["tensor"] == 0 else 1
    out = {"devices": float(mesh.size)}
    if training:
        p = _bytes(config.param_dtype)
        out["params"] = elements * p
        out["grads"] = elements * p
        out["optimizer (adam mu, nu)"] = elements * 2 * p
        per_layer = {LIGHTNING: 4 * config.hidden_size + 10 * hd,
                     "softmax": 4 * config.hidden_size + 2 * hd + 2 * kd}
        moe = config.experts_per_token * (2 * config.hidden_size + 3 * config.expert_size)
        layers = [per_layer[t] + moe for t in config.layer_types]
        if remat == "full":
            group = sum(layers[:config.layer_period])
            act = config.num_groups * config.hidden_size + group
        else:
            act = sum(layers) * (0.6 if remat == "dots" else 1.0)
        out["activations (estimate)"] = local_tokens * act * c
        out["logits + grad (float32)"] = local_tokens * config.vocab_size / vocab_shards * 4 * 2
    else:
        out["weights"] = elements * c
        softmax_layers = config.layer_types.count("softmax")
        lightning_layers = config.num_layers - softmax_layers
        sequences = max(batch_size // batch_shards, 1)
        kv_shards = mesh.shape["tensor"] if config.num_kv_heads % mesh.shape["tensor"] == 0 else 1
        out["kv cache (softmax layers)"] = softmax_layers * 2 * sequences * seq_len * kd / kv_shards * c
        out["lightning state (float32)"] = (lightning_layers * sequences * config.num_heads * config.head_dim ** 2
                                            * 4)
    out["total"] = sum(v for k, v in out.items() if k != "devices")
    return out


def plan_table(config: M1Config, mesh_axes: dict[str, int], *, batch_size: int, seq_len: int,
               remat: str = "full", training: bool = True) -> str:
    result = plan(config, mesh_axes, batch_size=batch_size, seq_len=seq_len, remat=remat, training=training)
    mesh_text = ",".join(f"{k}={v}" for k, v in mesh_axes.items()) or "one device"
    mode = f"training, remat={remat}" if training else "inference"
    lines = [f"{mode}: mesh {mesh_text} ({int(result['devices'])} devices), global batch {batch_size} x "
             f"{seq_len} tokens; per device:"]
    for name, value in result.items():
        if name != "devices":
            lines.append(f"  {name:<28} {value / GIB:10.2f} GiB")
    fits = [f"{kind} ({gib} GiB): {'fits' if result['total'] / GIB < 0.9 * gib else 'does not fit'}"
            for kind, gib in DEVICE_MEMORY_GIB.items()]
    lines.append("  " + "; ".join(fits) + " (90% usable)")
    return "\n".join(lines)
