"""Expert-parallel MoE on 8 fake CPU devices: forward, gradients and statistics equal one device on several meshes.

The mesh is passed to the layer (MoE(cfg, mesh=mesh)); the module-scoped problems draw their own seed, recorded on
each test that uses them so that a failure prints it (replay with M1JAX_TEST_SEED).
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from m1jax.config import M1Config, RunPolicy
from m1jax.layers.moe import MoE
from m1jax.layers.moe_core import expert_capacity, route
from m1jax.sharding import MESH_AXES, activation_sharding, create_mesh, shard_params


def assert_allclose(actual, desired, **tolerances):
    """np.testing.assert_allclose where NaN never counts as equal to NaN."""
    np.testing.assert_allclose(actual, desired, equal_nan=False, **tolerances)


# capacity ceil(0.25 * 72 * 3 / 8) = 7 calls per expert: 8 experts hold at most 56 of the >= 67 calls that the
# unmasked tokens keep (each keeps its first choice), so calls are dropped on every draw
CAPACITY_POLICY = RunPolicy(capacity_factor=0.25, expert_threshold=0.1)
MESHES = [{"expert": 8}, {"data": 2, "expert": 4}, {"fsdp": 2, "expert": 2, "tensor": 2}, {"data": 8},
          {"data": 2, "fsdp": 2, "expert": 2}]


def setup(rng, cfg, batch=8, length=13, uneven=False):
    """Random tokens and parameters; uneven: expert 0 overloaded and the last expert never chosen."""
    x = jnp.asarray(rng.standard_normal((batch, length, cfg.hidden_size)), jnp.float32) + 1.0  # sum(x) > 0
    params = jax.jit(MoE(cfg).init)(jax.random.key(int(rng.integers(1 << 30))), x)
    gate = params["params"]["gate"] * 20  # a router with confident, varied choices
    # +0.6 per input dim adds ~38 to expert 0's logit (sum(x) ~ 64), far above the spread of the x20 router's
    # logits: with +0.3 some random gates kept expert 0 out of the top 2 for >10% of tokens (~1 run in 1000)
    params["params"]["gate"] = gate.at[:, 0].add(0.6).at[:, -1].add(-100.0) if uneven else gate
    return params, x


def loss_and_grads(cfg, mesh=None, grouped_matmul=None, policy=RunPolicy()):
    def loss(params, x, mask):
        out, stats = MoE(cfg, grouped_matmul, mesh=mesh, policy=policy).apply(params, x, mask)
        return jnp.sum(jnp.sin(out) * jnp.arange(out.shape[-1])), (out, stats)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def on_mesh(cfg, mesh, params, x, mask, grouped_matmul=None, policy=RunPolicy()):
    """The layer given `mesh`, on inputs placed on it; no ambient mesh is set."""
    fn = loss_and_grads(cfg, mesh, grouped_matmul, policy)
    placed = (shard_params(params, mesh, None), jax.device_put(x, activation_sharding(mesh, ("batch", None, None))), mask)
    jaxpr = str(jax.make_jaxpr(fn)(*placed))
    assert "shard_map" in jaxpr  # the expert-parallel path ran, not XLA's own partitioning of the local one
    return fn(*placed)


def assert_same(got, want):
    (got_loss, (got_out, got_stats)), got_grads = got
    (want_loss, (want_out, want_stats)), want_grads = want
    assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-6)
    assert_allclose(got_loss, want_loss, rtol=1e-5, atol=1e-4)
    jax.tree.map(lambda a, b: assert_allclose(a, b, rtol=1e-5, atol=1e-6), got_stats, want_stats)
    jax.tree.map(lambda a, b: assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()),
                 got_grads, want_grads)


@pytest.fixture(scope="module")
def uneven_problem(draw_seed):
    """One random problem (drawn fresh each run) and its single-device result, shared by the mesh cases."""
    seed = draw_seed()
    rng = np.random.default_rng(seed)
    cfg = M1Config.from_preset("tiny", num_experts=8)
    params, x = setup(rng, cfg, uneven=True)
    mask = jnp.asarray(rng.random((8, 13)) > 0.2)
    counts = np.bincount(np.asarray(route(x.reshape(-1, cfg.hidden_size), params["params"]["gate"], 2).experts)
                         [np.asarray(mask).reshape(-1)].ravel(), minlength=8)
    assert counts[-1] == 0 and counts[0] >= 0.9 * mask.sum()  # an empty expert, an overloaded one
    return seed, cfg, (params, x, mask), loss_and_grads(cfg)(params, x, mask)


@pytest.mark.parametrize("axes", MESHES, ids=lambda a: "-".join(f"{k}{v}" for k, v in a.items()))
def test_sharded_moe_equals_one_device_forward_and_gradients(axes, uneven_problem, request):
    seed, cfg, args, want = uneven_problem
    request.node.user_properties.append(("seed", seed))
    assert_same(on_mesh(cfg, create_mesh(axes), *args), want)


def test_explicit_axis_mesh_is_resharded_into_the_shard_map(uneven_problem, request):
    seed, cfg, args, want = uneven_problem
    request.node.user_properties.append(("seed", seed))
    mesh = jax.make_mesh((2, 1, 4, 1), MESH_AXES)  # jax.make_mesh's default axes are Explicit
    assert jax.sharding.AxisType.Explicit in mesh.axis_types
    fn = loss_and_grads(cfg, mesh)
    with jax.set_mesh(mesh):  # resharding to a PartitionSpec needs the mesh in context
        assert "shard_map" in str(jax.make_jaxpr(fn)(*args))
        got = fn(*args)
    assert_same(got, want)


@pytest.fixture(scope="module")
def capacity_problem(draw_seed):
    """Capacity and threshold both biting, some padding, an expert width (90) that "tensor" = 4 does not divide."""
    seed = draw_seed()
    rng = np.random.default_rng(seed)
    cfg = M1Config.from_preset("tiny", num_experts=8, experts_per_token=3, expert_size=90)
    params, x = setup(rng, cfg, length=9)
    # a x10 router (not x20, nor one expert favoured): confident enough that the threshold skips choices (>= 6% of
    # them over 3,000 draws), soft enough that >= 8 tokens keep two or more, so the gate's gradient is not ~0
    # (a favoured expert left every token one choice of weight 1 on some draws: a gradient of pure rounding)
    params["params"]["gate"] = params["params"]["gate"] * 0.5
    mask = jnp.ones((8, 9), bool).at[3, 4:].set(False)
    want = loss_and_grads(cfg, policy=CAPACITY_POLICY)(params, x, mask)
    stats = want[0][1][1]
    assert stats["dropped_fraction"] > 0 and stats["skipped_fraction"] > 0
    assert stats["expert_calls"].max() <= expert_capacity(72, 3, 8, CAPACITY_POLICY.capacity_factor)
    return seed, cfg, (params, x, mask), want


@pytest.mark.parametrize("axes", [{"data": 2, "expert": 4}, {"expert": 2, "tensor": 4}],
                         ids=["data2-expert4", "expert2-tensor4-width-whole"])
def test_capacity_and_threshold_drop_the_same_calls_as_one_device(axes, capacity_problem, request):
    seed, cfg, args, want = capacity_problem
    request.node.user_properties.append(("seed", seed))
    assert_same(on_mesh(cfg, create_mesh(axes), *args, policy=CAPACITY_POLICY), want)


def test_bad_meshes_raise_before_compiling(rng):
    cfg = M1Config.from_preset("tiny", num_experts=4)
    params, x = setup(rng, cfg, batch=6, length=3)
    with pytest.raises(ValueError, match=r"'experts' dimension has size 4.*'expert': 8"):
        jax.jit(MoE(cfg, mesh=create_mesh({"data": 1, "expert": 8})).apply).trace(params, x)
    with pytest.raises(ValueError, match=r"'batch' dimension has size 6.*'data': 4.*'expert': 2.*product 8"):
        jax.jit(MoE(cfg, mesh=create_mesh({"data": 4, "expert": 2})).apply).trace(params, x)


def test_one_device_mesh_and_foreign_meshes_take_the_local_path(rng):
    cfg = M1Config.from_preset("tiny")
    params, x = setup(rng, cfg, batch=2, length=4)
    foreign = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    for mesh in (None, create_mesh(devices=jax.devices()[:1]), foreign):
        assert "shard_map" not in str(jax.make_jaxpr(MoE(cfg, mesh=mesh).apply)(params, x))


def test_an_ambient_mesh_is_never_picked_up_silently(rng):
    """Under jax.set_mesh of a spreading mesh, a layer built without one refuses (it would run one device's
    dispatch under XLA's partitioning); given the mesh it runs expert-parallel; a one-device ambient mesh is fine."""
    cfg = M1Config.from_preset("tiny")
    params, x = setup(rng, cfg, batch=2, length=4)
    mesh = create_mesh({"expert": 2}, devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
        with pytest.raises(ValueError, match=r"no mesh was passed.*M1ForCausalLM\(config, mesh=mesh\)"):
            jax.make_jaxpr(MoE(cfg).apply)(params, x)
        assert "shard_map" in str(jax.make_jaxpr(MoE(cfg, mesh=mesh).apply)(params, x))
    with jax.set_mesh(create_mesh(devices=jax.devices()[:1])):
        assert "shard_map" not in str(jax.make_jaxpr(MoE(cfg).apply)(params, x))


def test_init_under_a_mesh_is_the_one_device_init(rng):
    """Parameter shapes do not depend on the mesh: a layer given one initialises like one without it, even from a
    batch (one row) that the mesh's batch axes could not split."""
    cfg = M1Config.from_preset("tiny", num_experts=8)
    x = jnp.asarray(rng.standard_normal((1, 3, cfg.hidden_size)), jnp.float32)
    key = jax.random.key(int(rng.integers(1 << 30)))
    with_mesh = jax.jit(MoE(cfg, mesh=create_mesh({"data": 2, "expert": 4})).init)(key, x)
    jax.tree.map(np.testing.assert_array_equal, with_mesh, jax.jit(MoE(cfg).init)(key, x))


def test_pallas_grouped_matmul_runs_inside_the_shard_map(uneven_problem, request):
    """The GPU path: the Pallas kernel (interpret mode here) inside the expert-parallel shard_map."""
    from pallas_kernels.grouped_matmul import grouped_matmul
    pallas = lambda lhs, rhs, sizes: grouped_matmul(lhs, rhs, sizes, impl="pallas", interpret=True)
    seed, cfg, args, want = uneven_problem
    request.node.user_properties.append(("seed", seed))
    assert_same(on_mesh(cfg, create_mesh({"data": 2, "expert": 4}), *args, grouped_matmul=pallas), want)
