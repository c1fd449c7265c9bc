"""Analytic FLOP counts: the model's, independent of the kernels' run-time choices."""
import pytest

from m1jax.config import M1Config
from m1jax.flops import decode_flops_per_token, forward_flops, lightning_layer_flops


def test_lightning_flops_count_the_recurrence_whatever_the_kernel_block():
    cfg = M1Config.from_preset("small")
    hidden, hd, d = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.head_dim
    per_token = 2 * hidden * 3 * hd + 2 * hidden * hd + 2 * hd * hidden + cfg.num_heads * 4 * d * d
    assert lightning_layer_flops(cfg, 1000) == pytest.approx(1000 * per_token, rel=1e-12)
    # the kernel block is RunPolicy.block_size, which the count does not take: it cannot depend on it
    # a prompt token of a lightning layer costs what a decode step's does (the state makes both constant in T)
    lightning_only = cfg.replace(layer_types=("lightning",) * cfg.num_layers)
    assert forward_flops(lightning_only, 1) == pytest.approx(decode_flops_per_token(lightning_only, 5000),
                                                             rel=1e-12)
