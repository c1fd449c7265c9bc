"""The train step: next-token cross-entropy + MoE auxiliary losses, gradient accumulation, one jit with shardings.

loss = CE + router_aux_loss_coef * load-balancing loss + router_z_loss_coef * router z-loss
       + logit_z_loss_coef * mean(logsumexp(logits)^2)
CE is the mean over graded tokens (loss_mask). With microbatches, per-token sums are accumulated and divided by the
total graded-token count at the end, so accumulated CE and its gradient equal the large batch's exactly (the MoE
auxiliary terms are averaged over microbatches: their batch statistics are per microbatch). The MoE terms, the
gradients' shardings and the optimizer step are the run harness's (m1jax.train.harness), shared with RL.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from m1jax.model import M1ForCausalLM
from m1jax.train import harness
from m1jax.train.harness import TrainState, state_shardings  # noqa: F401  (the step's state and its shardings)

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids")


def init_state(model: M1ForCausalLM, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    rng = jax.random.key(seed)
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(init_rng, jnp.zeros((1, 8), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(state_rng))


def _sums(model: M1ForCausalLM, params, batch: dict):
    """Per-microbatch sums: (objective numerator pieces, metrics). CE and logit z-loss summed over graded tokens."""
    out = model.apply({"params": params}, batch["inputs"], segment_ids=batch["segment_ids"])
    logits = out.logits
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    ce_sum = jnp.sum((lse - target_logit) * mask)
    z_sum = jnp.sum(lse * lse * mask)
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * mask)
    return {"ce_sum": ce_sum, "z_sum": z_sum, "tokens": jnp.sum(mask), "correct": correct,
            "aux": harness.moe_aux_loss(model.config, out), "aux_loss": out.aux_loss, "router_z_loss": out.z_loss,
            "tokens_per_expert": out.routing["tokens_per_expert"]}


def _objective(model, logit_z_loss_coef, params, batch, total_tokens, num_micro):
    s = _sums(model, params, batch)
    objective = (s["ce_sum"] + logit_z_loss_coef * s["z_sum"]) / total_tokens + s["aux"] / num_micro
    return objective, s


def make_train_step(model: M1ForCausalLM, optimizer: optax.GradientTransformation, *,
                    logit_z_loss_coef: float = 0.0, microbatches: int = 1,
                    state_shardings: Any = None, batch_sharding: Any = None) -> Callable:
    """Returns jitted `step(state, batch) -> (state, metrics)`; the state is donated.

    batch: dict of (B, T) arrays (BATCH_KEYS); B must be divisible by `microbatches`.
    """
    if microbatches < 1:
        raise ValueError(f"microbatches={microbatches} must be >= 1")

    def step(state: TrainState, batch: dict):
        batch = {k: batch[k] for k in BATCH_KEYS}
        size = batch["inputs"].shape[0]
        if size % microbatches:
            raise ValueError(f"batch size {size} is not divisible by microbatches={microbatches}")
        micro = jax.tree.map(lambda x: x.reshape((microbatches, size // microbatches) + x.shape[1:]), batch)
        total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        grad_fn = jax.value_and_grad(
            lambda p, b: _objective(model, logit_z_loss_coef, p, b, total_tokens, microbatches), has_aux=True)

        def accumulate(carry, mb):
            grads, sums = carry
            (_, s), g = grad_fn(state.params, mb)
            g = harness.like_params(g, state_shardings)
            return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s)), None

        zero_grads = harness.like_params(jax.tree.map(jnp.zeros_like, state.params), state_shardings)
        zero_sums = jax.tree.map(jnp.zeros_like, jax.eval_shape(
            lambda: _sums(model, state.params, jax.tree.map(lambda x: x[0], micro))))
        (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums), micro)
        tokens_per_expert = sums["tokens_per_expert"]
        load = tokens_per_expert / jnp.maximum(jnp.sum(tokens_per_expert, axis=-1, keepdims=True), 1.0)
        metrics = {
            "loss": sums["ce_sum"] / total_tokens,
            "aux_loss": sums["aux_loss"] / microbatches,
            "router_z_loss": sums["router_z_loss"] / microbatches,
            "logit_z_loss": sums["z_sum"] / total_tokens,
            "token_accuracy": sums["correct"] / total_tokens,
            "grad_norm": optax.tree.norm(grads),
            "graded_tokens": sums["tokens"],
            "expert_load_max": jnp.max(load) * load.shape[-1],  # 1.0 = perfectly balanced
            "expert_load_min": jnp.min(load) * load.shape[-1],
        }
        return harness.apply_gradients(state, grads, optimizer), metrics

    return harness.jit_update(step, state_shardings, batch_sharding)


def make_eval_step(model: M1ForCausalLM) -> Callable:
    """Jitted `eval(params, batch) -> (B, T) argmax predictions`."""
    @jax.jit
    def predict(params, inputs, segment_ids):
        return jnp.argmax(model.apply({"params": params}, inputs, segment_ids=segment_ids).logits, axis=-1)
    return lambda params, batch: predict(params, batch["inputs"], batch["segment_ids"])
