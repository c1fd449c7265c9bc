"""Hugging Face checkpoints in and out: safetensors (one file or shards + index) <-> m1jax parameters.

Loading streams: each parameter leaf is built with `jax.make_array_from_callback`, whose callback reads only the
slices of the memory-mapped safetensors that the requested shard needs. The whole checkpoint is never held in host
memory; with a mesh each device shard is read straight into its place. Saving writes the original tensor names
(loadable by transformers' MiniMaxForCausalLM), shard by shard, each shard under `max_shard_bytes`.
"""
from __future__ import annotations

import collections
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.flax import save_file

from m1jax.checkpoint.names import DERIVED_BUFFERS, TensorMap, packed_source, tensor_maps
from m1jax.checkpoint.state import CheckpointError
from m1jax.config import M1Config, RunPolicy, stored_dtype
from m1jax.model import abstract_params

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class _Tensors:
    """Name -> lazily opened safetensors file, over a single file or an index of shards."""

    def __init__(self, directory: str):
        index_path, single_path = os.path.join(directory, INDEX_FILE), os.path.join(directory, SINGLE_FILE)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index_path} is not a safetensors index (a JSON object with a 'weight_map'): "
                                      f"{type(err).__name__}: {err}") from None
            self.file_of = {name: os.path.join(directory, shard) for name, shard in weight_map.items()}
        elif os.path.exists(single_path):
            self.file_of = {name: single_path for name in self._open_file(single_path, "its tensor list").keys()}
        else:
            raise FileNotFoundError(f"{directory} has neither {INDEX_FILE} nor {SINGLE_FILE}")
        self._open: dict[str, Any] = {}

    @staticmethod
    def _open_file(path: str, name: str):
        try:
            return safe_open(path, "flax")
        except Exception as err:  # safetensors' own errors do not name the file
            raise CheckpointError(f"safetensors file {path} is damaged (reading {name}): {err}; "
                                  "download or convert it again") from None

    def names(self) -> set[str]:
        return set(self.file_of)

    def slice(self, name: str):
        path = self.file_of[name]
        if path not in self._open:
            if not os.path.exists(path):
                raise FileNotFoundError(f"shard {path} (holding {name}) is missing")
            self._open[path] = self._open_file(path, f"tensor {name}")
        try:
            return self._open[path].get_slice(name)
        except Exception as err:
            raise CheckpointError(f"safetensors file {path}: cannot read tensor {name}: {err}") from None


def _expected_hf_shape(leaf_shape: tuple[int, ...], m: TensorMap) -> tuple[int, ...]:
    shape = leaf_shape[len(m.index):]
    return tuple(reversed(shape)) if m.transpose else tuple(shape)


class _Source:
    """Reads (a block of) one HF tensor, original or packed naming, already in m1jax orientation."""

    def __init__(self, tensors: _Tensors, m: TensorMap, expert_size: int):
        self.tensors, self.map = tensors, m
        if m.name in tensors.file_of:
            self.name, self.prefix = m.name, ()
        else:
            self.name, self.prefix = packed_source(m.name, expert_size)

    def shape(self) -> tuple[int, ...]:
        full = tuple(self.tensors.slice(self.name).get_shape())
        shape = list(full[sum(isinstance(p, int) for p in self.prefix):])
        for p in self.prefix:
            if isinstance(p, slice):
                shape[0] = len(range(*p.indices(shape[0])))
        return tuple(shape)

    def read(self, block: tuple[slice, ...], dtype) -> np.ndarray:
        """block: slices over the m1jax (in, out) orientation of this tensor."""
        hf_block = tuple(reversed(block)) if self.map.transpose else block
        index = list(self.prefix)
        if index and isinstance(index[-1], slice):  # packed gate_up rows: offset the row slice
            rows, first = index.pop(), hf_block[0]
            start, stop, _ = first.indices(rows.stop - rows.start)
            hf_block = (slice(rows.start + start, rows.start + stop),) + hf_block[1:]
        try:
            value = self.tensors.slice(self.name)[tuple(index) + hf_block]
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"safetensors file {self.tensors.file_of[self.name]}: cannot read tensor "
                                  f"{self.name}: {err}") from None
        value = jnp.asarray(value).astype(dtype)
        return np.asarray(value.T if self.map.transpose else value)


def _check_names(tensors: _Tensors, maps: list[TensorMap], config: M1Config) -> dict[str, _Source]:
    available = tensors.names()
    sources, missing = {}, []
    for m in maps:
        packed = packed_source(m.name, config.expert_size)
        if m.name in available or (packed and packed[0] in available):
            sources[m.name] = _Source(tensors, m, config.expert_size)
        else:
            missing.append(m.name)
    used = {s.name for s in sources.values()}
    unexpected = sorted(n for n in available - used if not DERIVED_BUFFERS.match(n))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match its config: {len(missing)} missing tensors "
                         f"{missing[:5]}{'...' if len(missing) > 5 else ''}, {len(unexpected)} unexpected tensors "
                         f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    return sources


def _leaf(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set_leaf(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def load_pretrained(path: str | os.PathLike, *, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
                    shardings: Any = None) -> tuple[M1Config, Any]:
    """Read a Hugging Face MiniMax directory (config.json + safetensors) -> (M1Config, params).

    dtype: parameter dtype ("float32", "bfloat16", ...; default: the one config.json records, `stored_dtype`). mesh:
    place each leaf with the
    project's sharding rules over this mesh; shardings: an explicit pytree of jax.sharding.Sharding instead.
    The router (`gate`) stays float32 whatever the dtype, as in the released checkpoint.
    """
    directory = os.fspath(path)
    config = M1Config.from_hf(directory)
    abstract = abstract_params(config, RunPolicy(param_dtype=dtype or stored_dtype(directory)))
    if shardings is None:
        shardings = _default_shardings(abstract, config, mesh)
    tensors = _Tensors(directory)
    maps = tensor_maps(config)
    sources = _check_names(tensors, maps, config)
    by_leaf: dict[tuple[str, ...], list[TensorMap]] = collections.defaultdict(list)
    for m in maps:
        leaf = _leaf(abstract, m.path)
        expected, found = _expected_hf_shape(leaf.shape, m), sources[m.name].shape()
        if expected != found:
            raise ValueError(f"tensor {m.name}: checkpoint shape {found}, config expects {expected}")
        by_leaf[m.path].append(m)

    params: dict = {}
    for leaf_path, leaf_maps in by_leaf.items():
        leaf = _leaf(abstract, leaf_path)
        at = {m.index: sources[m.name] for m in leaf_maps}
        lead = len(leaf_maps[0].index)

        def read_block(index, leaf=leaf, at=at, lead=lead):
            index = tuple(index) + (slice(None),) * (len(leaf.shape) - len(index))
            ranges = [range(*s.indices(n)) for s, n in zip(index[:lead], leaf.shape[:lead])]
            inner = index[lead:]
            if not ranges:
                return at[()].read(inner, leaf.dtype)
            block = [at[key].read(inner, leaf.dtype) for key in np.ndindex(*map(len, ranges))
                     for key in [tuple(r[i] for r, i in zip(ranges, key))]]
            return np.stack(block).reshape(tuple(map(len, ranges)) + block[0].shape)

        value = jax.make_array_from_callback(leaf.shape, _leaf(shardings, leaf_path), read_block)
        _set_leaf(params, leaf_path, value)
    return config, params


def _default_shardings(abstract: Any, config: M1Config, mesh: jax.sharding.Mesh | None) -> Any:
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, abstract)
    from m1jax.model import param_logical_axes
    from m1jax.sharding import param_shardings
    return param_shardings(abstract, mesh, param_logical_axes(config))


def save_pretrained(path: str | os.PathLike, config: M1Config, params: Any, *,
                    max_shard_bytes: int = 5 * 2**30, on_tensor=None) -> list[str]:
    """Write config.json (transformers flavour, its "dtype" the weights') and safetensors with the original tensor
    names.

    One `model.safetensors` when everything fits in one shard, else `model-0000i-of-0000N.safetensors` plus
    `model.safetensors.index.json`. Tensors are pulled to the host one at a time; a shard is written when full.
    on_tensor(name, index, count), if given, is called after each tensor (e.g. to draw a progress bar).
    Returns the written file names.
    """
    directory = os.fspath(path)
    os.makedirs(directory, exist_ok=True)
    _check_tree(config, params)
    config.save_hf(directory, dtype=jnp.dtype(params["embed"]["embedding"].dtype).name)
    maps = tensor_maps(config)
    current, current_bytes, total_size = {}, 0, 0
    temp_names: list[tuple[str, list[str]]] = []

    def flush():
        nonlocal current, current_bytes
        if current:
            name = f".shard-{len(temp_names):05d}.safetensors"
            save_file(current, os.path.join(directory, name), metadata={"format": "pt"})
            temp_names.append((name, list(current)))
            current, current_bytes = {}, 0

    for number, m in enumerate(maps):
        value = _leaf(params, m.path)[m.index] if m.index else _leaf(params, m.path)
        value = jnp.asarray(jax.device_get(value))
        value = value.T if m.transpose else value
        nbytes = value.size * value.dtype.itemsize
        if current and current_bytes + nbytes > max_shard_bytes:
            flush()
        current[m.name] = value
        current_bytes += nbytes
        total_size += nbytes
        if on_tensor is not None:
            on_tensor(m.name, number + 1, len(maps))
    flush()

    if len(temp_names) == 1:
        os.replace(os.path.join(directory, temp_names[0][0]), os.path.join(directory, SINGLE_FILE))
        _remove_stale(directory, keep={SINGLE_FILE})
        return [SINGLE_FILE]
    total = len(temp_names)
    weight_map, written = {}, []
    for i, (temp, names) in enumerate(temp_names, start=1):
        final = f"model-{i:05d}-of-{total:05d}.safetensors"
        os.replace(os.path.join(directory, temp), os.path.join(directory, final))
        weight_map.update({n: final for n in names})
        written.append(final)
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": int(total_size)}, "weight_map": weight_map}, f, indent=2)
    _remove_stale(directory, keep=set(written) | {INDEX_FILE})
    return written + [INDEX_FILE]


def _check_tree(config: M1Config, params: Any) -> None:
    """Every leaf present with the config's shape (names the first mismatch)."""
    abstract = abstract_params(config)
    flat_expected = dict(jax.tree_util.tree_flatten_with_path(abstract)[0])
    flat_given = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for key, spec in flat_expected.items():
        name = jax.tree_util.keystr(key)
        if key not in flat_given:
            raise ValueError(f"params lack {name} (shape {spec.shape}) required by the config")
        if tuple(flat_given[key].shape) != tuple(spec.shape):
            raise ValueError(f"params{name} has shape {tuple(flat_given[key].shape)}, config expects {spec.shape}")
    extra = [jax.tree_util.keystr(k) for k in flat_given if k not in flat_expected]
    if extra:
        raise ValueError(f"params hold leaves the config does not define: {extra[:5]}")


def _remove_stale(directory: str, keep: set[str]) -> None:
    """Drop safetensors/index files of an earlier save in the same directory (they would shadow the new ones)."""
    for name in os.listdir(directory):
        if (name.endswith(".safetensors") or name == INDEX_FILE) and name not in keep:
            os.remove(os.path.join(directory, name))
