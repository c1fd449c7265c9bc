"""The inference cache: what each layer remembers between calls.

    layers[l]         one entry per layer l (global index):
      lightning         {"state": (B, H, D, D) float32}         the decayed sum of k^T v; its size never grows
      softmax           {"key", "value": (B, K, S, D)}          the policy's compute dtype, S = max_len slots
    index             () int32    the next slot to write; every row advances together
    start             (B,) int32  first real slot of each row (prompts are left-padded: slots before it are padding)
    fresh             bool (static) nothing written yet (index 0), as known on the host: the first chunk then
                                  attends causally within itself (cuDNN flash attention on GPU)

A row's token at slot s has position s - start[b] (0 at its first real token, as transformers does with left
padding). Each layer's entry is its own buffer (not stacked by layer group like the parameters), so a decode step
updates it in place: see m1jax/model.py. The cache holds (B, K, S, D), not (B, S, K, D): see
m1jax/layers/softmax_attention.py.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from m1jax.config import LIGHTNING, M1Config, RunPolicy


@flax.struct.dataclass
class Cache:
    """layers: one {"state"} or {"key", "value"} dict per layer; index () int32; start (B,) int32; fresh: a static
    bool (part of the tree's structure, not a traced value: no device-side branch reads it)."""
    layers: tuple[dict[str, jax.Array], ...]
    index: jax.Array
    start: jax.Array
    fresh: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def batch_size(self) -> int:
        return self.start.shape[0]


def _layer_shapes(config: M1Config, batch: int, max_len: int,
                  policy: RunPolicy) -> tuple[dict[str, jax.ShapeDtypeStruct], ...]:
    heads, dim = config.num_heads, config.head_dim
    state = jax.ShapeDtypeStruct((batch, heads, dim, dim), jnp.float32)
    kv = jax.ShapeDtypeStruct((batch, config.num_kv_heads, max_len, dim), jnp.dtype(policy.compute_dtype))
    return tuple({"state": state} if kind == LIGHTNING else {"key": kv, "value": kv} for kind in config.layer_types)


def _check_sizes(batch: int, max_len: int) -> None:
    for name, value in (("batch", batch), ("max_len", max_len)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def abstract_cache(config: M1Config, batch: int, max_len: int, *, policy: RunPolicy = RunPolicy()) -> Cache:
    """The cache's shapes and dtypes (jax.ShapeDtypeStruct leaves) without allocating: a restore target. policy:
    the model's (its compute dtype is the keys' and values')."""
    _check_sizes(batch, max_len)
    return Cache(layers=_layer_shapes(config, batch, max_len, policy), index=jax.ShapeDtypeStruct((), jnp.int32),
                 start=jax.ShapeDtypeStruct((batch,), jnp.int32))


def init_cache(config: M1Config, batch: int, max_len: int, start: Any = None, *,
               policy: RunPolicy = RunPolicy()) -> Cache:
    """An empty cache of max_len slots for `batch` rows; start (B,) = each row's count of leading pads (default 0).
    policy: the model's (keys and values are held in its compute dtype)."""
    abstract = abstract_cache(config, batch, max_len, policy=policy)
    if start is None:
        start = np.zeros((batch,), np.int32)
    start = jnp.asarray(start, jnp.int32)
    if start.shape != (batch,):
        raise ValueError(f"start must have shape (batch,) = ({batch},), got {start.shape}")
    layers = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract.layers)
    return Cache(layers=layers, index=jnp.zeros((), jnp.int32), start=start, fresh=True)


def cache_bytes(config: M1Config, batch: int, max_len: int, *, policy: RunPolicy = RunPolicy()) -> int:
    """Bytes the cache takes: lightning states (fixed) plus the softmax layers' keys and values (linear in max_len)."""
    leaves = jax.tree.leaves(abstract_cache(config, batch, max_len, policy=policy))
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves))


def cache_max_len(cache: Cache) -> int | None:
    """The number of slots S of a cache (None when the model has no softmax layer: then nothing bounds it)."""
    for entry in cache.layers:
        if "key" in entry:
            return entry["key"].shape[2]
    return None


# ----- slots for continuous batching (m1jax.serve): move a row's slots, copy one row into another cache -----
def shift_slots(cache: Cache, delta: jax.Array) -> Cache:
    """Every row's softmax keys/values move `delta` slots later (earlier if negative); index and start follow.

    Slot s goes to (s + delta) mod S: what wraps around lands at or beyond the new index or before a row's new start,
    where it is never visible. Positions (slot - start) and lightning states are unchanged, so the rows' outputs are
    too. jit-friendly: delta may be traced.
    """
    delta = jnp.asarray(delta, jnp.int32)

    def move(entry):
        if "key" not in entry:
            return entry
        slots = entry["key"].shape[2]
        source = (jnp.arange(slots, dtype=jnp.int32) - delta) % slots
        return {name: jnp.take(x, source, axis=2) for name, x in entry.items()}

    return cache.replace(layers=tuple(move(e) for e in cache.layers), index=cache.index + delta,
                         start=cache.start + delta, fresh=False)


def insert_row(cache: Cache, row: Cache, slot: jax.Array) -> Cache:
    """Copy the one-row cache `row` into row `slot` of `cache`, aligned on their indices (same S and layer kinds).

    row's slot s lands at slot s + (cache.index - row.index) of cache, so the prefilled prompt ends right before
    cache.index; the row's start moves the same way. Lightning states are copied as they are.
    """
    if row.batch_size != 1:
        raise ValueError(f"row must be a one-row cache, got batch {row.batch_size}")
    delta = cache.index - row.index
    moved = shift_slots(row, delta)
    layers = tuple({name: jax.lax.dynamic_update_index_in_dim(big[name], small[name][0], slot, axis=0)
                    for name in big} for big, small in zip(cache.layers, moved.layers))
    start = jax.lax.dynamic_update_index_in_dim(cache.start, moved.start[0], slot, axis=0)
    return cache.replace(layers=layers, start=start, fresh=False)
