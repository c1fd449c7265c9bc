"""The inference cache: what each layer remembers between calls.

    layers[l]         one entry per layer l (global index):
      lightning         {"state": (B, H, D, D) float32}         the decayed sum of k^T v; its size never grows
      softmax           {"key", "value": (B, K, S, D)}          compute dtype, S = max_len slots
    index             () int32    the next slot to write; every row advances together
    start             (B,) int32  first real slot of each row (prompts are left-padded: slots before it are padding)

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

from m1jax.config import LIGHTNING, M1Config


@flax.struct.dataclass
class Cache:
    """layers: one {"state"} or {"key", "value"} dict per layer; index () int32; start (B,) int32."""
    layers: tuple[dict[str, jax.Array], ...]
    index: jax.Array
    start: jax.Array

    @property
    def batch_size(self) -> int:
        return self.start.shape[0]


def _layer_shapes(config: M1Config, batch: int, max_len: int) -> tuple[dict[str, jax.ShapeDtypeStruct], ...]:
    heads, dim = config.num_heads, config.head_dim
    state = jax.ShapeDtypeStruct((batch, heads, dim, dim), jnp.float32)
    kv = jax.ShapeDtypeStruct((batch, config.num_kv_heads, max_len, dim), jnp.dtype(config.compute_dtype))
    return tuple({"state": state} if kind == LIGHTNING else {"key": kv, "value": kv} for kind in config.layer_types)


def _check_sizes(batch: int, max_len: int) -> None:
    for name, value in (("batch", batch), ("max_len", max_len)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def abstract_cache(config: M1Config, batch: int, max_len: int) -> Cache:
    """The cache's shapes and dtypes (jax.ShapeDtypeStruct leaves) without allocating: a restore target."""
    _check_sizes(batch, max_len)
    return Cache(layers=_layer_shapes(config, batch, max_len), index=jax.ShapeDtypeStruct((), jnp.int32),
                 start=jax.ShapeDtypeStruct((batch,), jnp.int32))


def init_cache(config: M1Config, batch: int, max_len: int, start: Any = None) -> Cache:
    """An empty cache of max_len slots for `batch` rows; start (B,) = each row's count of leading pads (default 0)."""
    abstract = abstract_cache(config, batch, max_len)
    if start is None:
        start = np.zeros((batch,), np.int32)
    start = jnp.asarray(start, jnp.int32)
    if start.shape != (batch,):
        raise ValueError(f"start must have shape (batch,) = ({batch},), got {start.shape}")
    layers = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract.layers)
    return Cache(layers=layers, index=jnp.zeros((), jnp.int32), start=start)


def cache_bytes(config: M1Config, batch: int, max_len: int) -> int:
    """Bytes the cache takes: lightning states (fixed) plus the softmax layers' keys and values (linear in max_len)."""
    leaves = jax.tree.leaves(abstract_cache(config, batch, max_len))
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves))


def cache_max_len(cache: Cache) -> int | None:
    """The number of slots S of a cache (None when the model has no softmax layer: then nothing bounds it)."""
    for entry in cache.layers:
        if "key" in entry:
            return entry["key"].shape[2]
    return None
