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

Softmax attention workspace: what the path `causal_attention` takes on this platform needs (exact formulas in
`m1jax.layers.softmax_attention.attention_workspace_bytes`): the dense path's float32 (B, H, T, T) scores and
probabilities, the blocked path's tiles and (B, H, T) statistics, cuDNN's log-sum-exp. One layer's worth with
remat="full" (layers run one at a time), every softmax layer's otherwise. Inference counts the first prefill chunk.
`check_fits` compares the total with this machine's memory before anything compiles.
"""
from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import AbstractMesh

from m1jax.config import LIGHTNING, M1Config, RunPolicy
from m1jax.model import abstract_params, param_logical_axes

GIB = 2 ** 30
DEVICE_MEMORY_GIB = {"H100": 80, "H200": 141}
PLAN_POLICY = RunPolicy(remat="full")  # what `m1jax plan` and `m1jax train` assume unless told: float32, full remat


def _bytes(dtype: str) -> int:
    return np.dtype(jax.numpy.dtype(dtype)).itemsize


def _abstract_mesh(axes: dict[str, int]):
    from m1jax.sharding import MESH_AXES
    unknown = sorted(set(axes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"--mesh names unknown axes {unknown}; use {MESH_AXES}")
    sizes = tuple(int(axes.get(name, 1)) for name in MESH_AXES)
    return AbstractMesh(sizes, MESH_AXES)


def attention_path(config: M1Config, mesh_axes: dict[str, int], *, batch_size: int, seq_len: int,
                   policy: RunPolicy = RunPolicy(), platform: str | None = None) -> tuple[str, int]:
    """(path, workspace bytes per device) of one softmax layer's causal attention over seq_len tokens."""
    from m1jax.layers.softmax_attention import attention_impl, attention_workspace_bytes
    from m1jax.sharding import BATCH_AXES
    sizes = {name: int(mesh_axes.get(name, 1)) for name in ("data", "fsdp", "expert", "tensor")}
    local_batch = max(batch_size // math.prod(sizes[a] for a in BATCH_AXES), 1)
    heads = config.num_heads // sizes["tensor"] if config.num_heads % sizes["tensor"] == 0 else config.num_heads
    impl = attention_impl(local_batch, seq_len, heads, policy.compute_dtype, masked=False, platform=platform)
    return impl, attention_workspace_bytes(impl, local_batch, seq_len, heads, config.head_dim)


def plan(config: M1Config, mesh_axes: dict[str, int], *, batch_size: int, seq_len: int,
         policy: RunPolicy = PLAN_POLICY, training: bool = True, platform: str | None = None,
         prefill_chunk: int = 4096) -> dict[str, float]:
    """Per-device bytes by component, plus "devices" and "total". policy: the run's dtypes and remat. platform:
    where it runs ("cpu", "gpu"; default this process's backend), which decides the softmax attention path."""
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("prefill_chunk", prefill_chunk)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    from m1jax.sharding import BATCH_AXES, check_mesh, param_shardings
    mesh = _abstract_mesh(mesh_axes)
    check_mesh(mesh, num_experts=config.num_experts, batch_size=batch_size)
    abstract = abstract_params(config)
    remat = policy.remat
    shardings = param_shardings(abstract, mesh, param_logical_axes(config))
    elements = sum(math.prod(s.shard_shape(a.shape)) for a, s in
                   zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))
    batch_shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    local_tokens = batch_size // batch_shards * seq_len
    c = _bytes(policy.compute_dtype)
    hd, kd = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    vocab_shards = mesh.shape["tensor"] if config.vocab_size % mesh.shape["tensor"] == 0 else 1
    out = {"devices": float(mesh.size)}
    if training:
        p = _bytes(policy.param_dtype)
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
        _, workspace = attention_path(config, mesh_axes, batch_size=batch_size, seq_len=seq_len, policy=policy,
                                      platform=platform)
        held = 1 if remat == "full" else config.layer_types.count("softmax")
        out["softmax attention workspace"] = workspace * min(held, config.layer_types.count("softmax"))
    else:
        out["weights"] = elements * c
        softmax_layers = config.layer_types.count("softmax")
        lightning_layers = config.num_layers - softmax_layers
        sequences = max(batch_size // batch_shards, 1)
        kv_shards = mesh.shape["tensor"] if config.num_kv_heads % mesh.shape["tensor"] == 0 else 1
        out["kv cache (softmax layers)"] = softmax_layers * 2 * sequences * seq_len * kd / kv_shards * c
        out["lightning state (float32)"] = (lightning_layers * sequences * config.num_heads * config.head_dim ** 2
                                            * 4)
        _, workspace = attention_path(config, mesh_axes, batch_size=batch_size, seq_len=min(seq_len, prefill_chunk),
                                      policy=policy, platform=platform)
        out["softmax attention workspace"] = workspace if softmax_layers else 0
    out["total"] = sum(v for k, v in out.items() if k != "devices")
    return out


def plan_table(config: M1Config, mesh_axes: dict[str, int], *, batch_size: int, seq_len: int,
               policy: RunPolicy = PLAN_POLICY, training: bool = True, platform: str | None = None) -> str:
    result = plan(config, mesh_axes, batch_size=batch_size, seq_len=seq_len, policy=policy, training=training,
                  platform=platform)
    platform = platform or jax.default_backend()
    impl, _ = attention_path(config, mesh_axes, batch_size=batch_size, seq_len=seq_len, policy=policy,
                             platform=platform)
    mesh_text = ",".join(f"{k}={v}" for k, v in mesh_axes.items()) or "one device"
    mode = f"training, remat={policy.remat}" if training else "inference"
    lines = [f"{mode}: mesh {mesh_text} ({int(result['devices'])} devices), global batch {batch_size} x "
             f"{seq_len} tokens; softmax attention on {platform}: {impl}; per device:"]
    for name, value in result.items():
        if name != "devices":
            lines.append(f"  {name:<28} {value / GIB:10.2f} GiB")
    fits = [f"{kind} ({gib} GiB): {'fits' if result['total'] / GIB < 0.9 * gib else 'does not fit'}"
            for kind, gib in DEVICE_MEMORY_GIB.items()]
    lines.append("  " + "; ".join(fits) + " (90% usable)")
    return "\n".join(lines)


def host_memory_bytes(platform: str | None = None) -> int | None:
    """Memory one device can use: the accelerator's limit, or the host's physical memory on the CPU; None if unknown."""
    platform = platform or jax.default_backend()
    if platform != "cpu":
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("bytes_limit")
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(config: M1Config, mesh_axes: dict[str, int], *, batch_size: int, seq_len: int,
               policy: RunPolicy = PLAN_POLICY, training: bool = True, platform: str | None = None,
               available: int | None = None) -> dict[str, float]:
    """Raise MemoryError with the plan's figures when a run cannot fit this machine (checked before compiling);
    returns the plan. available: bytes per device (default: `host_memory_bytes`)."""
    result = plan(config, mesh_axes, batch_size=batch_size, seq_len=seq_len, policy=policy, training=training,
                  platform=platform)
    available = host_memory_bytes(platform) if available is None else available
    devices_here = 1 if (platform or jax.default_backend()) != "cpu" else int(result["devices"])
    if available and result["total"] * devices_here > available:
        worst = max((k for k in result if k not in ("devices", "total")), key=result.get)
        need = result["total"] * devices_here / GIB
        raise MemoryError(f"batch {batch_size} x {seq_len} tokens needs about {need:.1f} GiB "
                          f"({worst}: {result[worst] * devices_here / GIB:.1f} GiB) but this machine has "
                          f"{available / GIB:.1f} GiB; lower the batch size or sequence length"
                          + (", or use remat=full" if training and policy.remat != "full" else "")
                          + f" (see `m1jax plan --seq-len {seq_len} --batch-size {batch_size}`)")
    return result
