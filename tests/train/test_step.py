"""The train step's objective against a hand computation: CE over every graded token of the batch, the logit z-loss,
and the MoE auxiliary terms averaged over layers (per microbatch) and then over microbatches, all coefficients on.

The twin below is written from the formula in m1jax/train/step.py's docstring, from the model's per-layer routing
statistics (out.routing, one value per layer), not from the step's code or the model's aggregated aux_loss / z_loss.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from m1jax.config import M1Config
from m1jax.model import M1ForCausalLM
from m1jax.train.step import init_state, make_train_step

AUX, ROUTER_Z, LOGIT_Z = 0.5, 0.05, 1e-3
MICROBATCHES = 2


def random_batch(rng, rows=4, length=19, vocab=512):
    """Packed rows (two documents, then padding) with a ragged loss mask: awkward, not block multiples."""
    inputs = rng.integers(1, vocab, (rows, length)).astype(np.int32)
    targets = rng.integers(1, vocab, (rows, length)).astype(np.int32)
    split = rng.integers(3, length - 6, rows)
    end = rng.integers(length - 5, length + 1, rows)
    position = np.arange(length)[None]
    segment_ids = np.where(position < split[:, None], 1, 2) * (position < end[:, None])
    loss_mask = ((rng.random((rows, length)) < 0.7) & (segment_ids > 0)).astype(np.float32)
    loss_mask[:, 0] = 1.0  # every microbatch has graded tokens
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask, "segment_ids": segment_ids.astype(np.int32)}


def hand_objective(model, params, batch, aux_coef, router_z_coef, logit_z_coef, microbatches):
    """(CE + logit z) summed over all graded tokens / their count + the mean over microbatches of
    aux_coef * mean over layers of the load-balancing loss + router_z_coef * mean over layers of the router z-loss."""
    rows = batch["inputs"].shape[0] // microbatches
    total_tokens = jnp.sum(batch["loss_mask"])
    token_sum, aux_terms = 0.0, []
    for m in range(microbatches):
        mb = {k: v[m * rows:(m + 1) * rows] for k, v in batch.items()}
        out = model.apply({"params": params}, mb["inputs"], segment_ids=mb["segment_ids"])
        log_probs = jax.nn.log_softmax(out.logits, axis=-1)
        lse = jax.nn.logsumexp(out.logits, axis=-1)
        nll = -jnp.take_along_axis(log_probs, mb["targets"][..., None], axis=-1)[..., 0]
        token_sum = token_sum + jnp.sum(mb["loss_mask"] * (nll + logit_z_coef * lse ** 2))
        layers = out.routing["load_balancing_loss"].shape[0]
        aux_terms.append(aux_coef * jnp.sum(out.routing["load_balancing_loss"]) / layers
                         + router_z_coef * jnp.sum(out.routing["z_loss"]) / layers)
    return token_sum / total_tokens + sum(aux_terms) / microbatches


@pytest.fixture(scope="module")
def model():
    cfg = M1Config.from_preset("tiny", router_aux_loss_coef=AUX, router_z_loss_coef=ROUTER_Z)
    return M1ForCausalLM(cfg)


def test_accumulated_step_equals_the_hand_objective_with_every_coefficient_on(model, rng):
    batch = {k: jnp.asarray(v) for k, v in random_batch(rng).items()}
    optimizer = optax.sgd(1.0)  # parameters move by exactly -gradient
    state = init_state(model, optimizer, int(rng.integers(1 << 30)))
    params = jax.tree.map(np.asarray, state.params)
    objective = jax.jit(jax.value_and_grad(
        lambda p, aux: hand_objective(model, p, batch, aux, ROUTER_Z, LOGIT_Z, MICROBATCHES)))
    want_value, want_grads = objective(params, AUX)

    step = make_train_step(model, optimizer, logit_z_loss_coef=LOGIT_Z, microbatches=MICROBATCHES)
    new_state, metrics = step(state, batch)
    moved = jax.tree.map(lambda before, after: before - np.asarray(after), params, new_state.params)

    # float32 sums over ~100 tokens and 4 layers: relative error ~1e-6; the tolerance below is 100x that, and the
    # check right after shows that a wrong weight on the aux term (x2) moves the gradient 100x further than it.
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grads))
    close = lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, equal_nan=False)
    jax.tree.map(close, moved, want_grads)
    _, doubled = objective(params, 2 * AUX)
    gap = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(doubled), jax.tree.leaves(want_grads)))
    assert gap > 1e-3 * scale, "the aux term is too small for this test to see a wrong weight on it"

    tokens = float(np.sum(batch["loss_mask"]))
    assert float(metrics["graded_tokens"]) == tokens
    aux_part = want_value - (float(metrics["loss"]) + LOGIT_Z * float(metrics["logit_z_loss"]))
    np.testing.assert_allclose(AUX * float(metrics["aux_loss"]) + ROUTER_Z * float(metrics["router_z_loss"]),
                               aux_part, rtol=1e-4, equal_nan=False)


def test_model_aux_losses_are_the_layer_means_of_the_routing_statistics(model, rng):
    batch = random_batch(rng, rows=2)
    params = init_state(model, optax.sgd(1.0), int(rng.integers(1 << 30))).params
    out = jax.jit(lambda p: model.apply({"params": p}, batch["inputs"], segment_ids=batch["segment_ids"]))(params)
    per_layer = np.asarray(out.routing["load_balancing_loss"])
    assert per_layer.shape == (model.config.num_layers,) and np.all(np.isfinite(per_layer))
    assert np.ptp(per_layer) > 0  # layers differ, so a sum or a single layer would not pass as the mean
    np.testing.assert_allclose(out.aux_loss, per_layer.sum() / per_layer.size, rtol=1e-6, equal_nan=False)
    np.testing.assert_allclose(out.z_loss, np.asarray(out.routing["z_loss"]).mean(), rtol=1e-6, equal_nan=False)
