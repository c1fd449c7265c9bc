"""The train step: next-token cross-entropy + MoE auxiliary losses, gradient accumulation, one jit with shardings.

loss = CE + router_aux_loss_coef * load-balancing loss + router_z_loss_coef * router z-loss
       + logit_z_loss_coef * mean(logsumexp(logits)^2)
CE is the mean over graded tokens (loss_mask). With microbatches, per-token sums are accumulated and divided by the
total graded-token count at the end, so accumulated CE and its gradient equal the large batch's exactly (the MoE
auxiliary terms are averaged over microbatches: their batch statistics are per microbatch).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from m1jax.model import M1ForCausalLM

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids")


@flax.struct.dataclass
class TrainState:
    """step () int32; params and opt_state pytrees; rng (2,) uint32 raw key data (checkpoint-friendly)."""
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
    logit_z_loss_coef: float = 0.0


def init_state(model: M1ForCausalLM, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    rng = jax.random.key(seed)
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(init_rng, jnp.zeros((1, 8), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(state_rng))


def _sums(model: M1ForCausalLM, params, batch: dict, loss_cfg: LossConfig):
    """Per-microbatch sums: (objective numerator pieces, metrics). CE and logit z-loss summed over graded tokens."""
    out = model.apply({"params": params}, batch["inputs"], segment_ids=batch["segment_ids"])
    logits = out.logits
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    ce_sum = jnp.sum((lse - target_logit) * mask)
    z_sum = jnp.sum(lse * lse * mask)
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * mask)
    cfg = model.config
    aux = cfg.router_aux_loss_coef * out.aux_loss + cfg.router_z_loss_coef * out.z_loss
    return {"ce_sum": ce_sum, "z_sum": z_sum, "tokens": jnp.sum(mask), "correct": correct, "aux": aux,
            "aux_loss": out.aux_loss, "router_z_loss": out.z_loss,
            "tokens_per_expert": out.routing["tokens_per_expert"]}


def _objective(model, loss_cfg, params, batch, total_tokens, num_micro):
    s = _sums(model, params, batch, loss_cfg)
    objective = (s["ce_sum"] + loss_cfg.logit_z_loss_coef * s["z_sum"]) / total_tokens + s["aux"] / num_micro
    return objective, s


def make_train_step(model: M1ForCausalLM, optimizer: optax.GradientTransformation, *,
                    loss_cfg: LossConfig = LossConfig(), microbatches: int = 1,
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
        grad_fn = jax.value_and_grad(lambda p, b: _objective(model, loss_cfg, p, b, total_tokens, microbatches),
                                     has_aux=True)

        def like_params(tree):  # gradients take their parameters' shardings (FSDP-sharded, not replicated)
            if state_shardings is None:
                return tree
            return jax.lax.with_sharding_constraint(tree, state_shardings.params)

        def accumulate(carry, mb):
            grads, sums = carry
            (_, s), g = grad_fn(state.params, mb)
            return (jax.tree.map(jnp.add, grads, like_params(g)), jax.tree.map(jnp.add, sums, s)), None

        zero_grads = like_params(jax.tree.map(jnp.zeros_like, state.params))
        zero_sums = jax.tree.map(jnp.zeros_like, jax.eval_shape(
            lambda: _sums(model, state.params, jax.tree.map(lambda x: x[0], micro), loss_cfg)))
        (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums), micro)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
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
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng)
        return new_state, metrics

    if state_shardings is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(step, in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
                   donate_argnums=0)


def state_shardings(abstract_state: TrainState, optimizer: optax.GradientTransformation, mesh) -> TrainState:
    """Shardings of a TrainState: params by the project's rules (m1jax.sharding), optimizer moments like their
    parameters, scalars replicated."""
    from m1jax.sharding import param_shardings
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = param_shardings(abstract_state.params, mesh)
    opt_state = optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract_state.opt_state, params,
                                      transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=params, opt_state=opt_state, rng=replicated)


def make_eval_step(model: M1ForCausalLM) -> Callable:
    """Jitted `eval(params, batch) -> (B, T) argmax predictions`."""
    @jax.jit
    def predict(params, inputs, segment_ids):
        return jnp.argmax(model.apply({"params": params}, inputs, segment_ids=segment_ids).logits, axis=-1)
    return lambda params, batch: predict(params, batch["inputs"], batch["segment_ids"])
