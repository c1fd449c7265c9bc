"""The HF name map: every released M1 tensor maps to exactly one parameter slice, and back (abstract shapes only)."""
import collections
import json
import os

import numpy as np
import pytest

from m1jax.checkpoint.names import packed_source, tensor_maps
from m1jax.config import M1Config
from m1jax.model import abstract_params

M1_INDEX = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "minimax-m1",
                        "model.safetensors.index.json")


def leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def assert_maps_cover_params_exactly(config):
    maps = tensor_maps(config)
    names = [m.name for m in maps]
    assert len(names) == len(set(names))
    abstract = abstract_params(config)
    covered = collections.defaultdict(set)
    for m in maps:
        shape = leaf(abstract, m.path).shape
        assert len(m.index) < len(shape)
        assert all(0 <= i < n for i, n in zip(m.index, shape)), m
        assert m.index not in covered[m.path], f"{m.name} maps onto a slice already taken"
        covered[m.path].add(m.index)
    import jax
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    assert {tuple(k.key for k in p) for p, _ in flat} == set(covered), "every leaf is reached"
    for path, indices in covered.items():
        shape = leaf(abstract, path).shape
        lead = len(next(iter(indices)))
        assert len(indices) == int(np.prod(shape[:lead])), f"{path} leading slices not all covered"
    return names


@pytest.mark.skipif(not os.path.exists(M1_INDEX), reason="released M1 index not present")
def test_every_released_tensor_maps_to_one_parameter_and_back():
    with open(M1_INDEX) as f:
        released = set(json.load(f)["weight_map"])
    assert len(released) == 8243
    names = assert_maps_cover_params_exactly(M1Config.from_preset("minimax-m1-80k"))
    assert set(names) == released


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_maps_cover_research_presets(preset):
    assert_maps_cover_params_exactly(M1Config.from_preset(preset))


def test_unperiodic_schedule_maps():
    cfg = M1Config.from_preset("tiny", layer_types=("lightning", "softmax", "lightning", "lightning", "softmax"))
    names = assert_maps_cover_params_exactly(cfg)
    assert "model.layers.4.self_attn.o_proj.weight" in names
    assert "model.layers.3.self_attn.qkv_proj.weight" in names


def test_packed_expert_names():
    assert packed_source("model.layers.3.block_sparse_moe.experts.5.w1.weight", 96) == \
        ("model.layers.3.mlp.experts.gate_up_proj", (5, slice(0, 96)))
    assert packed_source("model.layers.3.block_sparse_moe.experts.5.w3.weight", 96) == \
        ("model.layers.3.mlp.experts.gate_up_proj", (5, slice(96, 192)))
    assert packed_source("model.layers.0.block_sparse_moe.experts.2.w2.weight", 96) == \
        ("model.layers.0.mlp.experts.down_proj", (2,))
    assert packed_source("model.layers.0.block_sparse_moe.gate.weight", 96) == ("model.layers.0.mlp.gate.weight", ())
    assert packed_source("model.norm.weight", 96) is None
