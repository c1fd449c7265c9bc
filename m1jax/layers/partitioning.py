"""Logical axis names, given where each parameter is created; modules whose `init` still returns plain arrays.

A layer creates each parameter with `named(init, "embed", "heads")` (flax's `nn.with_logical_partitioning`): one
logical name per dimension. `m1jax.sharding.LOGICAL_AXIS_RULES` maps the names to mesh axes, in one table. The
scanned layer groups add "layers" in front (`nn.scan(..., metadata_params={nn.PARTITION_NAME: "layers"})`).

Parameters stay plain pytrees (DESIGN.md): `Module.init` unboxes flax's name boxes, so `model.init(...)["params"]`
holds arrays as before; `logical_axes(module, *args)` reads the names back from an abstract (shape-only) init.
"""
from typing import Any, Callable

import flax.linen as nn
import jax


def named(init: Callable, *names: str) -> Callable:
    """`init` whose parameter carries one logical axis name per dimension."""
    return nn.with_logical_partitioning(init, names)


class Module(nn.Module):
    """nn.Module whose init returns plain arrays: the logical names stay in the module (see `logical_axes`)."""

    def init(self, *args, **kwargs):
        return nn.meta.unbox(super().init(*args, **kwargs))


def logical_axes(module: nn.Module, *args, **kwargs) -> Any:
    """The parameter tree `module.init(rng, *args, **kwargs)["params"]` would return, with each array replaced by the
    tuple of its dims' logical names (None for a dim created without a name). Nothing is allocated."""
    boxed = jax.eval_shape(lambda: nn.Module.init(module, jax.random.key(0), *args, **kwargs))["params"]
    is_box = lambda x: isinstance(x, nn.Partitioned)
    return jax.tree.map(lambda x: tuple(x.names) if is_box(x) else (None,) * len(x.shape), boxed, is_leaf=is_box)
