"""A train step sharded over a mesh of 8 fake CPU devices equals the single-device step."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax

from m1jax.config import M1Config
from m1jax.model import M1ForCausalLM
from m1jax.sharding import batch_sharding, create_mesh
from m1jax.train.data import make_data
from m1jax.train.step import init_state, make_train_step, state_shardings


def assert_allclose(actual, desired, **tolerances):
    """np.testing.assert_allclose where NaN never counts as equal to NaN."""
    np.testing.assert_allclose(actual, desired, equal_nan=False, **tolerances)


@pytest.mark.parametrize("axes", [{"data": 2, "fsdp": 2, "expert": 2}, {"expert": 4, "tensor": 2}])
def test_sharded_step_equals_single_device(axes):
    cfg = M1Config.from_preset("tiny")
    model = M1ForCausalLM(cfg)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))  # params move by the gradient
    batch = {k: jnp.asarray(v) for k, v in
             make_data("mqar", batch_size=8, seq_len=40, seed=5, vocab_size=cfg.vocab_size).batch(0).items()}
    single, single_metrics = make_train_step(model, optimizer)(init_state(model, optimizer, 0), batch)

    mesh = create_mesh(axes)
    abstract = jax.eval_shape(lambda: init_state(model, optimizer, 0))
    shardings = state_shardings(abstract, optimizer, mesh)
    state = jax.jit(lambda: init_state(model, optimizer, 0), out_shardings=shardings)()
    step = make_train_step(model.clone(mesh=mesh), optimizer, state_shardings=shardings,
                           batch_sharding=batch_sharding(mesh, 8))
    with jax.set_mesh(mesh):
        sharded, metrics = step(state, jax.device_put(batch, batch_sharding(mesh, 8)))
    assert sharded.params["groups"]["layer_0"]["moe"]["w1"].sharding.spec[1] == "expert"
    assert_allclose(metrics["loss"], single_metrics["loss"], rtol=1e-6)
    assert_allclose(metrics["grad_norm"], single_metrics["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
                 sharded.params, single.params)
