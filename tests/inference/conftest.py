"""Shared pieces of the inference tests: random parameters without running an init forward (fast on the CPU)."""
import pytest

from m1jax import M1Config
from m1jax.params import draw_params


@pytest.fixture(scope="session")
def tiny_config():
    """4 layers in 2 scanned groups of [lightning, softmax], vocab 512."""
    return M1Config.from_preset("tiny")


@pytest.fixture(scope="session")
def tiny_params(tiny_config):
    return draw_params(tiny_config, 0)
