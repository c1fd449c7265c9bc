"""A tiny random Hugging Face checkpoint (byte tokenizer) shared by the end-to-end eval tests."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax import M1Config, abstract_params, save_pretrained


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Parameters drawn with numpy from the abstract shapes (no init forward to compile): matrices N(0, 1/fan_in),
    norm scales U(0.5, 1.5), embeddings N(0, 1). Fixed seed: the checkpoint is a fixture, not a random input."""
    config = M1Config.from_preset("tiny", block_size=8)
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            values = rng.uniform(0.5, 1.5, leaf.shape)
        elif "embed" in name:
            values = rng.standard_normal(leaf.shape)
        else:
            values = rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[-2])
        return jnp.asarray(values, leaf.dtype)

    directory = tmp_path_factory.mktemp("eval-ckpt")
    save_pretrained(directory, config, jax.tree_util.tree_map_with_path(draw, abstract_params(config)))
    return str(directory)
