"""The run harness: what pretraining (`m1jax.train.loop`) and RL (`m1jax.rl.trainer`) share, each in one place.

A run directory (the `out` of either loop):

    OUT/model_config.json    the model, as Hugging Face's config.json; a rerun with another model is refused
    OUT/run_config.json      the run's settings as used (RL: OUT/rl_config.json)
    OUT/checkpoints/<step>/  the TrainState and a meta dict (m1jax.checkpoint.state), the final step always among them
    OUT/metrics.jsonl        one line per logged step, and OUT/tensorboard/ when asked (m1jax.train.run_log)

Rerunning a command on OUT resumes from the newest readable checkpoint and says so on stderr ("resuming from step N
of OUT; training on to step M"). Held-out data (pretraining's eval batch, RL's eval prompts) is the training
generator under seed + HELD_OUT_SEED_OFFSET.

One update, the same in both loops:

    objective = the loop's loss + router_aux_loss_coef * load-balancing loss + router_z_loss_coef * router z-loss
    grads     = d objective / d params, constrained to the parameters' shardings (FSDP-sharded, not replicated)
    state     = TrainState(step + 1, AdamW-updated params and moments, rng)

The MoE coefficients are the model config's; jit donates the state, which keeps its shardings in and out.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from m1jax import sharding
from m1jax.checkpoint.state import TrainCheckpoints
from m1jax.config import M1Config, same_architecture
from m1jax.model import param_logical_axes
from m1jax.progress import status
from m1jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from m1jax.train.run_log import RunLog

MODEL_CONFIG_FILE = "model_config.json"
CHECKPOINT_DIR = "checkpoints"
HELD_OUT_SEED_OFFSET = 1_000_003


@flax.struct.dataclass
class TrainState:
    """step () int32; params and opt_state pytrees; rng (2,) uint32 raw key data (checkpoint-friendly)."""
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def check_count(value, name: str, minimum: int) -> None:
    """A run setting that counts something: an integer >= minimum (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r}: pass an integer >= {minimum}")


# ------------------------------------------------------------------------------------------------ the run directory
def same_model(a: M1Config, b: M1Config) -> bool:
    """Whether two configs describe the same model, i.e. whether a run's checkpoints fit both: the architecture
    (`same_architecture`); the run-time policy (dtypes, remat, ...) is not in a config and may change on resume."""
    return same_architecture(a, b)


def check_same_model(out: str, config: M1Config) -> None:
    path = os.path.join(out, MODEL_CONFIG_FILE)
    if os.path.exists(path) and not same_model(M1Config.from_hf(path), config):
        raise ValueError(f"{out} holds a run of another model ({path} differs from this run's model); use a new "
                         "--out directory or the same model")


def write_json(path: str, value: dict) -> None:
    """Write JSON atomically (temporary file, then rename); values JSON cannot hold are written as strings."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


def write_run_files(out: str, config: M1Config, run_config_file: str, settings: Any) -> None:
    """OUT/model_config.json and OUT/<run_config_file> (the settings dataclass as used), by the lead host."""
    if jax.process_index() == 0:
        write_json(os.path.join(out, MODEL_CONFIG_FILE), config.to_hf())
        write_json(os.path.join(out, run_config_file), dataclasses.asdict(settings))


def run_log(out: str, start: int, tensorboard: bool) -> RunLog:
    """OUT/metrics.jsonl from step `start` on; a non-lead host writes metrics.jsonl.<process index>."""
    index = jax.process_index()
    return RunLog(out, start, tensorboard=tensorboard, suffix=f".{index}" if index else "")


def checkpoints(out: str, keep: int) -> TrainCheckpoints:
    return TrainCheckpoints(os.path.join(out, CHECKPOINT_DIR), keep=keep)


def checkpoint_due(done: int, every: int, steps: int) -> bool:
    """A checkpoint every `every` steps (0: none in between) and always at the final step."""
    return bool(every and done % every == 0) or done == steps


# ------------------------------------------------------------------------------------------------ resume
def placement(abstract_state: TrainState, shardings: TrainState | None) -> TrainState:
    """Where each leaf of the state lives: its sharding on a mesh, else the first device (explicit, so that every
    jitted step compiles once, whatever produced its input)."""
    if shardings is not None:
        return shardings
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: device, abstract_state)


def resume(checkpoints: TrainCheckpoints, abstract_state: TrainState, shardings: TrainState | None, *, out: str,
           steps: int, quiet: bool) -> tuple[int, TrainState, dict] | None:
    """(step, state, meta) of the newest readable checkpoint, placed like the run's state, or None for a new run."""
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_state,
                          placement(abstract_state, shardings))
    restored = checkpoints.restore_latest(target)
    if restored is not None:
        start = restored[0]
        status(f"resuming from step {start} of {out}"
               + (f" (the run asks for {steps} steps: nothing to train)" if start >= steps
                  else f"; training on to step {steps}"), quiet=quiet)
    return restored


# ------------------------------------------------------------------------------------------------ mesh and data
def state_shardings(abstract_state: TrainState, optimizer: optax.GradientTransformation, mesh) -> TrainState:
    """Shardings of a TrainState: params by the project's rules (m1jax.sharding), optimizer moments like their
    parameters, scalars replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = sharding.param_shardings(abstract_state.params, mesh, param_logical_axes(abstract_state.params))
    opt_state = optax.tree_map_params(optimizer, lambda _, sh: sh, abstract_state.opt_state, params,
                                      transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=params, opt_state=opt_state, rng=replicated)


def mesh_for(axes: dict[str, int], config: M1Config, abstract_state: TrainState,
             optimizer: optax.GradientTransformation, batch_size: int):
    """(mesh, state shardings) for axes like {"data": 2, "expert": 4}; ValueError when the experts or the batch of
    one update do not divide the mesh."""
    mesh = sharding.create_mesh(axes)
    sharding.check_mesh(mesh, num_experts=config.num_experts, batch_size=batch_size)
    return mesh, state_shardings(abstract_state, optimizer, mesh)


def mesh_context(mesh):
    """Under the mesh `constrain` places activations (None: one device, nothing to enter)."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def to_device(batch: dict, shardings=None) -> dict:
    """Host arrays -> device arrays: on the default device (shardings None), or by a sharding (one for every key, or
    a dict by key). Every process holds the same global batch and materialises only the rows of its own devices, so
    the same code runs on one device, a mesh, or several hosts."""
    if shardings is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_callback(v.shape, shardings[k] if isinstance(shardings, dict) else shardings,
                                              lambda index, v=v: v[index])
    return out


# ------------------------------------------------------------------------------------------------ the update
def optimizer_for(cfg: OptimizerConfig, total_steps: int):
    """(the optimizer config as used, AdamW, its learning-rate schedule) over `total_steps` optimizer updates."""
    used = dataclasses.replace(cfg, total_steps=total_steps)
    return used, make_optimizer(used), learning_rate_schedule(used)


def moe_aux_loss(config: M1Config, out) -> jax.Array:
    """The MoE auxiliary terms of an objective, from a model output (out.aux_loss, out.z_loss: layer means)."""
    return config.router_aux_loss_coef * out.aux_loss + config.router_z_loss_coef * out.z_loss


def like_params(tree, shardings: TrainState | None):
    """Gradients (or anything shaped like the parameters) take the parameters' shardings."""
    return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings.params)


def apply_gradients(state: TrainState, grads, optimizer: optax.GradientTransformation) -> TrainState:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                      rng=state.rng)


def jit_update(update: Callable, shardings: TrainState | None = None, batch_shardings: Any = None) -> Callable:
    """jit `update(state, batch) -> (state, metrics)`, donating the state; on a mesh the state keeps `shardings`."""
    if shardings is None:
        return jax.jit(update, donate_argnums=0)
    return jax.jit(update, in_shardings=(shardings, batch_shardings), out_shardings=(shardings, None),
                   donate_argnums=0)
