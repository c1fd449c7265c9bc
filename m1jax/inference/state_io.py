"""Inference-state checkpoints with orbax: stop a long prefill (or a decode) part-way, resume later, same tokens.

    directory/state   the InferenceState pytree (cache, padded prompt, drawn tokens, done flags, rng, routing counts)
    directory/meta    JSON: the request (sampling, stop ids, chunk size, seed), the model config, the state's shapes

`load_inference_state` rebuilds the restore target from meta, checks the saved config against the model's, and
returns (state, request): pass both to `continue_generation` (or `engine.prefill` / `engine.decode`).
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from m1jax.config import M1Config, RunPolicy, architecture_differences
from m1jax.inference.cache import cache_max_len
from m1jax.inference.engine import InferenceState, Request, abstract_state
from m1jax.inference.sampling import SamplingParams


def _request_to_json(request: Request) -> dict:
    out = dataclasses.asdict(request)
    out["stop_ids"] = list(request.stop_ids)
    return out


def _request_from_json(raw: dict) -> Request:
    return Request(max_new_tokens=raw["max_new_tokens"], sampling=SamplingParams(**raw["sampling"]),
                   stop_ids=tuple(raw["stop_ids"]), pad_id=raw["pad_id"], chunk_size=raw["chunk_size"],
                   seed=raw["seed"])


def _split_empty(tree):
    """Orbax refuses zero-size arrays (e.g. the stop ids of a request that has none): save the others as a flat
    list and rebuild the empty ones from the restore target's shapes."""
    leaves, treedef = jax.tree.flatten(tree)
    return [x for x in leaves if x.size], treedef


def _join_empty(kept, target):
    leaves, treedef = jax.tree.flatten(target)
    kept = iter(kept)
    return jax.tree.unflatten(treedef, [next(kept) if x.size else jnp.zeros(x.shape, x.dtype) for x in leaves])


def save_inference_state(directory: str | os.PathLike, state: InferenceState, request: Request,
                         config: M1Config) -> str:
    """Write state + meta to a new directory (it must not exist yet). Returns its absolute path."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory):
        raise ValueError(f"{directory} already exists; choose a new directory for the inference state")
    cache_len = cache_max_len(state.cache)
    meta = {"request": _request_to_json(request), "config": config.to_hf(),
            "shapes": {"batch": state.cache.batch_size, "prompt_len": state.prompt_len,
                       "max_len": cache_len if cache_len is not None else state.prompt_len + request.max_new_tokens}}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        kept, _ = _split_empty(state)
        checkpointer.save(directory, args=ocp.args.Composite(state=ocp.args.StandardSave(kept),
                                                             meta=ocp.args.JsonSave(meta)))
    return directory


def load_inference_state(directory: str | os.PathLike, config: M1Config, *,
                         policy: RunPolicy = RunPolicy()) -> tuple[InferenceState, Request]:
    """Restore (state, request) saved by `save_inference_state` for a model of this config run under `policy`
    (model.policy; it may differ from the saving run's: the cache is restored in its compute dtype)."""
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no inference state at {directory}")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        meta = checkpointer.restore(directory, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        saved = M1Config.from_hf(meta["config"])
        differs = architecture_differences(saved, config)  # the architecture only: run-time policy may change
        if differs:
            raise ValueError(f"the inference state at {directory} was made by another model: config fields "
                             f"{differs[:5]} differ; load it with the config it was saved with")
        request = _request_from_json(meta["request"])
        shapes = meta["shapes"]
        target = abstract_state(config, shapes["batch"], shapes["prompt_len"], shapes["max_len"],
                                request.max_new_tokens, len(request.stop_ids), policy=policy)
        device = jax.devices()[0]
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                             sharding=jax.sharding.SingleDeviceSharding(device)),
                              target)
        kept_target, _ = _split_empty(target)
        kept = checkpointer.restore(directory, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(kept_target))).state
    return _join_empty(kept, target), request
