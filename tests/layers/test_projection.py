"""The layers' projection: a single row runs as a two-row GEMM (XLA:GPU would turn a vector x matrix product into a
slow reduction) and gives the plain product; any other shape is nn.Dense unchanged."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.layers.projection import Projection


def dot_lhs_shapes(fn, *args):
    return [eqn.invars[0].aval.shape for eqn in jax.make_jaxpr(fn)(*args).eqns if eqn.primitive.name == "dot_general"]


@pytest.mark.parametrize("shape", [(1, 1, 24), (1, 24), (2, 1, 24), (1, 3, 24), (24,)])
def test_projection_is_the_dense_product_and_pads_only_one_row(shape, rng):
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    layer = Projection(10, use_bias=False)
    params = layer.init(jax.random.PRNGKey(0), x)
    kernel = params["params"]["kernel"]
    assert kernel.shape == (24, 10)
    got = layer.apply(params, x)
    assert got.shape == shape[:-1] + (10,)
    np.testing.assert_allclose(got, jnp.einsum("...i,io->...o", x, kernel, precision="highest"), rtol=1e-5, atol=1e-6)
    rows = int(np.prod(shape[:-1]))
    assert dot_lhs_shapes(lambda x: layer.apply(params, x), x) == [(2, 24) if rows == 1 else shape]
