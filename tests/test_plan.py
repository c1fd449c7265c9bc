"""The memory planner: exact sharded weight bytes from abstract shapes, on meshes far larger than this machine."""
import pytest

from m1jax.config import M1Config
from m1jax.params import count_params
from m1jax.plan import GIB, plan, plan_table


def test_expert_and_fsdp_sharding_divides_the_weights():
    cfg = M1Config.from_preset("minimax-m1-80k", compute_dtype="bfloat16")
    one = plan(cfg, {}, batch_size=1, seq_len=1024, training=False)
    assert one["weights"] == count_params(cfg)["total"] * 2  # bf16, unsharded
    eight = plan(cfg, {"tensor": 8}, batch_size=1, seq_len=1024, training=False)
    assert eight["weights"] < one["weights"] / 7  # nearly everything splits over heads, expert width, vocab
    assert one["kv cache (softmax layers)"] == 10 * 2 * 1024 * 8 * 128 * 2  # 40,960 bytes per token
    assert one["lightning state (float32)"] == 70 * 64 * 128 * 128 * 4  # 280 MiB, whatever the context


def test_training_plan_for_128_devices():
    cfg = M1Config.from_preset("minimax-m1-80k", compute_dtype="bfloat16")
    result = plan(cfg, {"fsdp": 16, "expert": 8}, batch_size=128, seq_len=8192, remat="full")
    assert result["devices"] == 128
    assert result["optimizer (adam mu, nu)"] == 2 * result["params"]
    ideal = count_params(cfg)["total"] * 4 / 128
    assert ideal <= result["params"] < 1.5 * ideal
    table = plan_table(cfg, {"fsdp": 16, "expert": 8}, batch_size=128, seq_len=8192)
    assert "H100" in table and "GiB" in table and result["total"] / GIB > 50


def test_bad_meshes_fail_with_the_axis_named():
    cfg = M1Config.from_preset("minimax-m1-80k")
    with pytest.raises(ValueError, match="expert"):
        plan(cfg, {"expert": 3}, batch_size=6, seq_len=128)
    with pytest.raises(ValueError, match="batch"):
        plan(cfg, {"data": 4}, batch_size=6, seq_len=128)
    with pytest.raises(ValueError, match="unknown axes"):
        plan(cfg, {"pipeline": 2}, batch_size=8, seq_len=128)
