"""A tiny random Hugging Face checkpoint (byte tokenizer) shared by the end-to-end eval tests."""
import pytest

from m1jax import M1Config, save_pretrained
from m1jax.params import draw_params


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """m1jax.params.draw_params with a fixed seed: the checkpoint is a fixture, not a random input."""
    config = M1Config.from_preset("tiny")
    directory = tmp_path_factory.mktemp("eval-ckpt")
    save_pretrained(directory, config, draw_params(config, 0))
    return str(directory)
