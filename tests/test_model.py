"""The whole model: packing equals separate documents, remat changes nothing, full M1 lowers on the CPU quickly."""
import time

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from m1jax import M1Config, M1ForCausalLM, abstract_params, init_params
from m1jax.config import RunPolicy


def test_packed_row_equals_documents_run_separately(rng):
    cfg = M1Config.from_preset("tiny")
    params = init_params(cfg, jax.random.key(1))
    lengths = [11, 1, 4, 17, 5]  # documents cross blocks of 8; the fourth starts exactly at one (token 16)
    docs = [rng.integers(0, cfg.vocab_size, (1, n)) for n in lengths]
    packed = jnp.asarray(np.concatenate(docs, axis=1))
    segments = jnp.asarray(np.concatenate([np.full((1, n), i + 1) for i, n in enumerate(lengths)], axis=1))
    model = M1ForCausalLM(cfg, RunPolicy(block_size=8))  # the lightning kernel in blocks of 8
    packed_logits = model.apply({"params": params}, packed, segment_ids=segments).logits
    alone = jnp.concatenate([model.apply({"params": params}, jnp.asarray(d)).logits for d in docs], axis=1)
    np.testing.assert_allclose(packed_logits, alone, rtol=2e-5, atol=2e-5)


def test_padding_is_excluded_from_routing_statistics():
    cfg = M1Config.from_preset("tiny")
    params = init_params(cfg, jax.random.key(2))
    ids = jax.random.randint(jax.random.key(3), (2, 12), 0, cfg.vocab_size)
    segments = jnp.asarray([[1] * 12, [1] * 7 + [0] * 5])
    out = M1ForCausalLM(cfg).apply({"params": params}, ids, segment_ids=segments)
    assert out.routing["tokens_per_expert"].shape == (cfg.num_layers, cfg.num_experts)
    np.testing.assert_allclose(out.routing["tokens_per_expert"].sum(-1), 19 * cfg.experts_per_token)
    assert np.isfinite(out.aux_loss) and np.isfinite(out.z_loss)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_loss_and_gradients(remat):
    cfg = M1Config.from_preset("tiny")
    params = init_params(cfg, jax.random.key(4))
    ids = jax.random.randint(jax.random.key(5), (2, 21), 0, cfg.vocab_size)

    def loss(p, remat):
        logits = M1ForCausalLM(cfg, RunPolicy(remat=remat)).apply({"params": p}, ids).logits
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])
    base, grads = jax.value_and_grad(loss)(params, "none")
    other, other_grads = jax.value_and_grad(loss)(params, remat)
    np.testing.assert_allclose(base, other, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, other_grads)
    with pytest.raises(ValueError, match="remat"):
        loss(params, "some")


def test_full_minimax_m1_traces_and_lowers_in_under_a_minute():
    cfg, bf16 = M1Config.from_preset("minimax-m1-80k"), RunPolicy(param_dtype="bfloat16", compute_dtype="bfloat16")
    start = time.perf_counter()
    params = abstract_params(cfg, bf16)
    ids = jax.ShapeDtypeStruct((1, 2048), jnp.int32)
    apply = lambda p, i: M1ForCausalLM(cfg, bf16).apply({"params": p}, i).logits
    assert jax.eval_shape(apply, params, ids).shape == (1, 2048, 200_064)
    lowered = jax.jit(apply).lower(params, ids)
    elapsed = time.perf_counter() - start
    assert "stablehlo" in lowered.as_text()[:20000]
    assert elapsed < 60, f"tracing and lowering took {elapsed:.1f}s"
    assert params["groups"]["layer_0"]["moe"]["w1"].shape == (10, 32, 6144, 9216)
