"""Meshes, the logical-axis tables, parameter and batch shardings, and the whole model on a mesh (8 fake devices)."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from m1jax import M1Config, M1ForCausalLM, abstract_params
from m1jax.config import RunPolicy
from m1jax.model import param_logical_axes
from m1jax.sharding import (MESH_AXES, activation_sharding, batch_sharding, check_mesh, constrain, create_mesh,
                            param_shardings, shard_params)


def random_params(cfg, rng):
    """Parameters drawn with numpy from `rng` (faster than compiling the model's init): norm scales near 1."""

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(leaf.dtype)
        return jnp.asarray(1 + 0.1 * noise if jax.tree_util.keystr(path).endswith("['scale']") else 0.05 * noise)
    return jax.tree_util.tree_map_with_path(draw, abstract_params(cfg))


def test_create_mesh_has_all_axes_and_checks_the_device_count():
    mesh = create_mesh({"data": 2, "fsdp": 2, "expert": 2})
    assert mesh.axis_names == MESH_AXES and dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}
    assert dict(create_mesh({"expert": 4, "data": -1}).shape)["data"] == 2
    assert dict(create_mesh().shape) == {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}  # default: data parallel
    one = create_mesh(devices=jax.devices()[:1])
    assert one.size == 1 and all(v == 1 for v in dict(one.shape).values())
    with pytest.raises(ValueError, match=r"multiply to 6 but there are 8 devices"):
        create_mesh({"data": 3, "expert": 2})
    with pytest.raises(ValueError, match=r"unknown mesh axes \['model'\]"):
        create_mesh({"model": 8})
    with pytest.raises(ValueError, match=r"axis 'expert' has size 0"):
        create_mesh({"expert": 0})
    with pytest.raises(ValueError, match="only one axis may be -1"):
        create_mesh({"expert": -1, "data": -1})
    with pytest.raises(ValueError, match=r"cannot be split into axis 'data'"):
        create_mesh({"expert": 3, "data": -1})


def test_every_parameter_of_m1_has_a_rule_and_the_big_ones_are_split():
    params = abstract_params(M1Config.from_preset("minimax-m1-80k"), RunPolicy(param_dtype="bfloat16"))
    logical = param_logical_axes(params)
    leaves = jax.tree_util.tree_leaves_with_path(logical, is_leaf=lambda x: isinstance(x, tuple))
    unnamed = [jax.tree_util.keystr(path) for path, names in leaves if None in names]
    assert not unnamed, f"parameters without a sharding rule: {unnamed}"
    shardings = param_shardings(params, create_mesh({"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}), logical)
    moe = shardings["groups"]["layer_0"]["moe"]
    assert moe["w1"].spec == P(None, "expert", "fsdp", "tensor")
    assert moe["w2"].spec == P(None, "expert", "tensor", "fsdp")
    assert moe["gate"].spec == P(None, "fsdp", None)
    assert shardings["groups"]["layer_0"]["attn"]["qkv_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert shardings["groups"]["layer_7"]["attn"]["o_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
    assert shardings["embed"]["embedding"].spec == P("tensor", "fsdp")
    assert shardings["final_norm"]["scale"].spec == P(None)
    biggest = max(jax.tree.leaves(params), key=lambda a: a.size)
    per_device = shardings["groups"]["layer_0"]["moe"]["w1"].shard_shape(biggest.shape)
    assert np.prod(per_device) * 8 == biggest.size  # the experts are split eight ways


def test_dims_that_do_not_divide_are_replicated_but_experts_raise():
    cfg = M1Config.from_preset("tiny", hidden_size=60, expert_size=90, num_experts=4)  # 60 % 8, 90 % 4 != 0
    params, names = abstract_params(cfg), param_logical_axes(cfg)
    shardings = param_shardings(params, create_mesh({"fsdp": 8}), names)
    assert shardings["groups"]["layer_0"]["moe"]["w1"].spec == P(None, None, None, None)
    assert shardings["lm_head"]["kernel"].spec == P(None, None)
    shardings = param_shardings(params, create_mesh({"expert": 2, "tensor": 4}), names)
    assert shardings["groups"]["layer_0"]["moe"]["w1"].spec == P(None, "expert", None, None)  # 90 % 4: whole
    assert shardings["groups"]["layer_1"]["attn"]["q_proj"]["kernel"].spec == P(None, None, "tensor")
    with pytest.raises(ValueError, match=r"moe/w1: its 'experts' dimension has size 4.*'expert': 8"):
        param_shardings(params, create_mesh({"expert": 8}), names)
    with pytest.raises(ValueError, match=r"'experts' dimension has size 4.*'expert': 8"):
        check_mesh(create_mesh({"expert": 8}), num_experts=4)


def test_batch_sharding_and_activation_constraints():
    mesh = create_mesh({"data": 2, "fsdp": 2, "expert": 2})
    assert batch_sharding(create_mesh({"data": 2, "tensor": 4})).spec == P("data", None)
    assert batch_sharding(mesh).spec == P(("data", "fsdp", "expert"), None)
    assert batch_sharding(mesh, batch_size=16, ndim=3).spec == P(("data", "fsdp", "expert"), None, None)
    with pytest.raises(ValueError, match=r"'batch' dimension has size 12.*'data': 2, 'fsdp': 2, 'expert': 2.*"
                                         r"product 8"):
        batch_sharding(mesh, batch_size=12)
    with pytest.raises(ValueError, match="unknown logical axis name 'time'"):
        activation_sharding(mesh, ("batch", "time"))
    x = jnp.arange(8 * 6 * 4, dtype=jnp.float32).reshape(8, 6, 4)
    assert constrain(x, "batch", "length", "act_embed") is x  # no ambient mesh: nothing to do
    tensor_mesh = create_mesh({"data": 2, "tensor": 4})
    with jax.set_mesh(tensor_mesh):
        y = jax.jit(lambda a: constrain(a * 2, "batch", None, "heads"))(x)
        with pytest.raises(ValueError, match=r"4 logical names.*shape \(8, 6, 4\)"):
            constrain(x, "batch", "length", "act_embed", "heads")
    assert y.sharding.spec == P("data", None, "tensor")
    np.testing.assert_array_equal(y, x * 2)


def test_shard_params_places_every_leaf_and_keeps_values(rng):
    cfg = M1Config.from_preset("tiny")
    params = random_params(cfg, rng)
    mesh = create_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
    placed = shard_params(params, mesh, param_logical_axes(cfg))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), placed, params)
    w1 = placed["groups"]["layer_1"]["moe"]["w1"]
    assert w1.sharding.spec == P(None, "expert", "fsdp", "tensor")
    assert w1.addressable_shards[0].data.shape == (2, 2, 32, 48)


def test_load_pretrained_onto_a_mesh(tmp_path, rng):
    from m1jax.checkpoint.hf import load_pretrained, save_pretrained
    cfg = M1Config.from_preset("tiny")
    params = random_params(cfg, rng)
    save_pretrained(tmp_path, cfg, params)
    mesh = create_mesh({"data": 2, "expert": 4})
    _, loaded = load_pretrained(tmp_path, mesh=mesh)
    assert loaded["groups"]["layer_0"]["moe"]["w2"].sharding.spec == P(None, "expert", None, None)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), loaded, params)


def test_whole_model_on_a_mesh_equals_one_device(rng):
    cfg, policy = M1Config.from_preset("tiny"), RunPolicy(block_size=8, capacity_factor=1.0)
    params = random_params(cfg, rng)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (8, 11)))
    segments = jnp.asarray(np.where(np.arange(11) < rng.integers(4, 12, (8, 1)), 1, 0))
    forward = jax.jit(lambda p, i, s: M1ForCausalLM(cfg, policy).apply({"params": p}, i, segment_ids=s))
    want = forward(params, ids, segments)
    mesh = create_mesh({"data": 2, "expert": 2, "tensor": 2})
    forward = jax.jit(lambda p, i, s: M1ForCausalLM(cfg, policy, mesh=mesh).apply({"params": p}, i, segment_ids=s))
    with jax.set_mesh(mesh):
        placed = shard_params(params, mesh, param_logical_axes(params))
        args = (placed, *(jax.device_put(a, batch_sharding(mesh)) for a in (ids, segments)))
        assert "shard_map" in str(jax.make_jaxpr(forward)(*args))
        got = forward(*args)
    real = np.asarray(segments, bool)
    np.testing.assert_allclose(got.logits[real], want.logits[real], rtol=1e-4, atol=1e-4)
    assert got.routing["dropped_fraction"].shape == (cfg.num_layers,)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got.routing, want.routing)
    np.testing.assert_allclose(got.aux_loss, want.aux_loss, rtol=1e-5)


def test_names_come_from_where_parameters_are_created_and_big_unnamed_ones_raise():
    from m1jax.layers.moe import MoE
    from m1jax.layers.partitioning import logical_axes
    cfg = M1Config.from_preset("tiny")
    assert param_logical_axes(abstract_params(cfg)) == param_logical_axes(cfg)  # a tree's names are its config's
    assert param_logical_axes(cfg)["groups"]["layer_1"]["attn"]["k_proj"]["kernel"] == ("layers", "embed", "kv_heads")
    x = jnp.zeros((2, 3, cfg.hidden_size))
    names = logical_axes(MoE(cfg), x)
    assert names == {"gate": ("embed", "router"), "w1": ("experts", "embed", "expert_mlp"),
                     "w3": ("experts", "embed", "expert_mlp"), "w2": ("experts", "expert_mlp", "embed")}
    mesh = create_mesh({"expert": 4, "tensor": 2})
    layer = jax.eval_shape(lambda: MoE(cfg).init(jax.random.key(0), x))["params"]
    assert param_shardings(layer, mesh, names)["w2"].spec == P("expert", "tensor", None)
    assert param_shardings(layer, mesh, None)["w2"].spec == P(None, None, None)  # small and unnamed: replicated
    big = {"params": {"extra": jax.ShapeDtypeStruct((1024, 512), jnp.float32)}}  # 2 MiB, no names
    with pytest.raises(ValueError, match=r"parameter params/extra \(1024, 512\) \(2.0 MiB\) has no logical axis "
                                         r"name.*LOGICAL_AXIS_RULES in m1jax/sharding.py"):
        param_shardings(big, mesh, None)
    assert param_shardings(big, mesh, {"params": {"extra": ("embed", "vocab")}})["params"]["extra"].spec == \
        P(None, "tensor")
    with pytest.raises(ValueError, match=r"unknown logical axis name 'hidden'"):
        param_shardings(big, mesh, {"params": {"extra": ("hidden", "vocab")}})


def test_one_mesh_parser_for_every_command():
    import argparse

    from m1jax.cli_args import mesh_spec
    from m1jax.sharding import parse_mesh
    assert parse_mesh("data=2, expert=4") == mesh_spec("data=2, expert=4") == {"data": 2, "expert": 4}
    assert parse_mesh("") is None and parse_mesh(None) is None
    for bad, message in (("gpu=4", r"part 'gpu=4'"), ("data=0", r"part 'data=0'"), ("data", r"part 'data'"),
                         ("data=2,data=2", r"axis 'data' given twice")):
        with pytest.raises(ValueError, match=message):
            parse_mesh(bad)
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            mesh_spec(bad)
