"""Shared pieces of the inference tests: random parameters without running an init forward (fast on the CPU)."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from m1jax import M1Config, abstract_params


def draw_params(config: M1Config, seed: int):
    """Parameters of `config` drawn with numpy: matrices N(0, 1/fan_in), norm scales U(0.5, 1.5), embeddings N(0, 1).

    Wider than the model's 0.02 init so that logits and routing differ clearly between tokens.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            values = rng.uniform(0.5, 1.5, leaf.shape)
        elif "embed" in name:
            values = rng.standard_normal(leaf.shape)
        else:
            values = rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[-2])
        return jnp.asarray(values, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(config))


@pytest.fixture(scope="session")
def tiny_config():
    """4 layers in 2 scanned groups of [lightning, softmax], block 8, vocab 512."""
    return M1Config.from_preset("tiny", block_size=8)


@pytest.fixture(scope="session")
def tiny_params(tiny_config):
    return draw_params(tiny_config, 0)
