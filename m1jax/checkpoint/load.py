"""One loader for whatever a user points at: a Hugging Face directory (config.json + safetensors, `hf`) or a
training output (model_config.json + orbax checkpoints, `state`). It sits above both, so neither imports the other
back."""
from __future__ import annotations

import os

import jax

from m1jax.checkpoint.hf import load_pretrained
from m1jax.checkpoint.state import load_training_output


def load_any(path: str | os.PathLike, *, dtype: str | None = None):
    """(M1Config, params) from a Hugging Face directory (config.json + safetensors) or a training output."""
    path = os.fspath(path)
    if os.path.exists(os.path.join(path, "model_config.json")):
        config, params = load_training_output(path)
        if dtype is not None:
            params = jax.tree_util.tree_map_with_path(  # the router stays float32
                lambda p, x: x if getattr(p[-1], "key", None) == "gate" else x.astype(dtype), params)
        return config, params
    if os.path.exists(os.path.join(path, "config.json")):
        return load_pretrained(path, dtype=dtype)
    raise FileNotFoundError(f"{path} is neither a Hugging Face checkpoint (config.json) nor a training output "
                            "(model_config.json)")
