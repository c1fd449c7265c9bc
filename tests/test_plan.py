"""The memory planner: exact sharded weight bytes from abstract shapes, on meshes far larger than this machine."""
import pytest

from m1jax.config import M1Config, RunPolicy
from m1jax.params import count_params
from m1jax.plan import GIB, plan, plan_table


def test_expert_and_fsdp_sharding_divides_the_weights():
    cfg, bf16 = M1Config.from_preset("minimax-m1-80k"), RunPolicy(compute_dtype="bfloat16")
    one = plan(cfg, {}, batch_size=1, seq_len=1024, policy=bf16, training=False)
    assert one["weights"] == count_params(cfg)["total"] * 2  # bf16, unsharded
    eight = plan(cfg, {"tensor": 8}, batch_size=1, seq_len=1024, policy=bf16, training=False)
    assert eight["weights"] < one["weights"] / 7  # nearly everything splits over heads, expert width, vocab
    assert one["kv cache (softmax layers)"] == 10 * 2 * 1024 * 8 * 128 * 2  # 40,960 bytes per token
    assert one["lightning state (float32)"] == 70 * 64 * 128 * 128 * 4  # 280 MiB, whatever the context


def test_training_plan_for_128_devices():
    cfg = M1Config.from_preset("minimax-m1-80k")
    result = plan(cfg, {"fsdp": 16, "expert": 8}, batch_size=128, seq_len=8192,
                  policy=RunPolicy(compute_dtype="bfloat16", remat="full"))
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


def test_fsdp_training_step_compiles_without_involuntary_rematerialization(capfd):
    """The FSDP-sharded embedding table used to be gathered row-wise into hidden-split activations that XLA could
    only re-split over the batch by replicating them ("[SPMD] Involuntary full rematerialization", forward and
    backward): the table is now gathered before the lookup. Captures XLA's own warnings (file descriptor 2)."""
    import jax
    import jax.numpy as jnp

    from m1jax.model import M1ForCausalLM, abstract_params
    from m1jax.model import param_logical_axes
    from m1jax.sharding import batch_sharding, create_mesh, param_shardings

    cfg = M1Config.from_preset("tiny")
    mesh = create_mesh({"data": 2, "fsdp": 2, "expert": 2})
    model = M1ForCausalLM(cfg, mesh=mesh)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params(cfg),
                          param_shardings(abstract_params(cfg), mesh, param_logical_axes(cfg)))
    ids = jax.ShapeDtypeStruct((8, 32), jnp.int32, sharding=batch_sharding(mesh, 8))

    def loss(params, ids):
        return jnp.mean(model.apply({"params": params}, ids).logits ** 2)

    capfd.readouterr()
    with jax.set_mesh(mesh):
        jax.jit(jax.value_and_grad(loss)).lower(params, ids).compile()
    assert "Involuntary full rematerialization" not in capfd.readouterr().err


def test_plan_follows_the_attention_path_of_the_platform():
    """--seq-len 8192 on the CPU: the blocked path, so no (T, T) term (it was a 66 GB failure against a 1.7 GiB
    plan); short sequences: the dense path's four float32 (B, H, T, T) arrays; GPU bf16: cuDNN."""
    tiny = M1Config.from_preset("tiny")
    long = plan(tiny, {}, batch_size=8, seq_len=8192, platform="cpu")
    assert long["softmax attention workspace"] < 0.25 * GIB
    assert long["total"] < 2 * GIB
    short = plan(tiny, {}, batch_size=2, seq_len=512, platform="cpu")
    assert short["softmax attention workspace"] == 4 * 2 * tiny.num_heads * 512 ** 2 * 4
    assert "softmax attention on cpu: blocked" in plan_table(tiny, {}, batch_size=8, seq_len=8192, platform="cpu")
    bf16 = RunPolicy(compute_dtype="bfloat16", remat="full")
    assert "cudnn" in plan_table(tiny, {}, batch_size=8, seq_len=8192, policy=bf16, platform="gpu")
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        plan(tiny, {}, batch_size=8, seq_len=0)


@pytest.mark.parametrize("impl, length", [("dense", 512), ("blocked", 4096)])
def test_attention_workspace_matches_the_compiled_gradient(impl, length):
    import jax
    import jax.numpy as jnp

    from m1jax.layers.softmax_attention import attention_workspace_bytes, causal_attention
    q = jax.ShapeDtypeStruct((2, length, 4, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((2, length, 2, 16), jnp.float32)
    loss = lambda q, k, v: jnp.sum(causal_attention(q, k, v, impl=impl) ** 2)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes  # measured: 1.02x (dense), 0.91x (blocked)
    assert 0.5 < temp / attention_workspace_bytes(impl, 2, length, 4, 16) < 2.0


def test_check_fits_fails_before_compiling_with_the_figures():
    from m1jax.plan import check_fits
    tiny = M1Config.from_preset("tiny")
    assert check_fits(tiny, {}, batch_size=2, seq_len=64, platform="cpu", available=8 * GIB)["total"] < GIB
    with pytest.raises(MemoryError, match=r"batch 64 x 65536 tokens needs about .* GiB .* this machine has 8.0 GiB"):
        check_fits(tiny, {}, batch_size=64, seq_len=65536, platform="cpu", available=8 * GIB)
