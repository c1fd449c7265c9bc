"""Training checkpoints with orbax: asynchronous saves every N steps, the last K kept, the data position and the
config saved beside the state, and resume from the latest checkpoint that restores cleanly.

A torn or partial checkpoint (a crash mid-write leaves orbax's temporary folder, which is never listed; a damaged
finished one fails to restore) is skipped with a warning and the previous one is used.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class TrainCheckpoints:
    """directory/<step>/{state, meta}: state is the TrainState pytree, meta a JSON dict (data position, config)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest checkpoint that restores, or None when there is none.

        abstract_state: a pytree of jax.ShapeDtypeStruct (with shardings) telling where each leaf goes.
        """
        self.manager.wait_until_finished()
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            except Exception as err:  # a damaged checkpoint must never stop a resume: fall back to an older one
                warnings.warn(f"checkpoint at step {step} in {self.directory} could not be restored "
                              f"({type(err).__name__}: {str(err)[:200]}); trying an earlier one", stacklevel=2)
                continue
            if restored.meta is None or restored.state is None:
                warnings.warn(f"checkpoint at step {step} is incomplete; trying an earlier one", stacklevel=2)
                continue
            return step, restored.state, dict(restored.meta)
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (keeping shardings) of a pytree of arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


def load_training_output(out_dir: str | os.PathLike, step: int | None = None):
    """(M1Config, params) from a training output directory (model_config.json + checkpoints/), latest step by default.

    Restores the saved pytree without a target (the optimizer state is read and dropped).
    """
    from m1jax.config import M1Config

    out_dir = os.fspath(out_dir)
    config_path = os.path.join(out_dir, "model_config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{out_dir} is not a training output: it has no model_config.json")
    checkpoints = TrainCheckpoints(os.path.join(out_dir, "checkpoints"), async_save=False)
    steps = checkpoints.steps()
    if not steps:
        raise FileNotFoundError(f"{out_dir}/checkpoints holds no checkpoint; train with --checkpoint-every N")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"no checkpoint at step {step} in {out_dir}; available: {steps}")
    restored = checkpoints.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    checkpoints.close()
    return M1Config.from_hf(config_path), restored.state["params"]


def load_any(path: str | os.PathLike, *, dtype: str | None = None):
    """(M1Config, params) from a Hugging Face directory (config.json + safetensors) or a training output."""
    path = os.fspath(path)
    if os.path.exists(os.path.join(path, "model_config.json")):
        config, params = load_training_output(path)
        if dtype is not None:
            config = config.replace(param_dtype=dtype)
            params = jax.tree_util.tree_map_with_path(  # the router stays float32
                lambda p, x: x if getattr(p[-1], "key", None) == "gate" else x.astype(dtype), params)
        return config, params
    if os.path.exists(os.path.join(path, "config.json")):
        from m1jax.checkpoint.hf import load_pretrained
        return load_pretrained(path, dtype=dtype)
    raise FileNotFoundError(f"{path} is neither a Hugging Face checkpoint (config.json) nor a training output "
                            "(model_config.json)")
