"""Group-relative advantages (GRPO style, used by CISPO and DAPO): no value model, one baseline per prompt.

Each prompt is sampled G times; a response's advantage is its reward relative to the other responses to the
same prompt:

    A_ij = (R_ij - mean_j R_ij) / (std_j R_ij + eps)

Std convention (``std=``): "unbiased" divides the squared deviations by G - 1 (torch's default ``std``, what
GRPO implementations use), "population" by G, and None skips the division (mean-centring only, as in
Dr. GRPO). A group whose rewards are all equal gets exactly zero advantages, whatever the convention.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

STD_CONVENTIONS = ("unbiased", "population", None)


def group_advantages(rewards, group_size: int | None = None, *, eps: float = 1e-6, std: str | None = "unbiased"):
    """(N, G) float32 advantages from rewards (N, G), or from flat rewards (N*G,) with ``group_size=G``.

    Flat rewards are grouped as consecutive runs of G (prompt-major, the G samples of a prompt adjacent).
    G == 1 raises ValueError: a single sample has no group baseline, so its advantage is undefined.
    """
    if std not in STD_CONVENTIONS:
        raise ValueError(f"std={std!r}, expected one of {STD_CONVENTIONS}")
    if not eps >= 0:
        raise ValueError(f"eps={eps!r}, expected a float >= 0 added to the std to avoid dividing by zero")
    rewards = jnp.asarray(rewards)
    if rewards.ndim == 1:
        if group_size is None:
            raise ValueError("rewards is flat (N*G,): pass group_size=G, or pass rewards shaped (N, G)")
        if group_size < 1 or rewards.shape[0] % group_size:
            raise ValueError(
                f"group_size={group_size} does not divide the {rewards.shape[0]} flat rewards: "
                "expected N*G rewards, the G samples of each prompt adjacent"
            )
        rewards = rewards.reshape(-1, group_size)
    elif rewards.ndim == 2:
        if group_size is not None and group_size != rewards.shape[1]:
            raise ValueError(
                f"group_size={group_size} but rewards has shape {tuple(rewards.shape)} (N, G): drop group_size or "
                "make it equal G"
            )
    else:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)}, expected (N, G) or flat (N*G,) with group_size")
    num_samples = rewards.shape[1]
    if num_samples == 1:
        raise ValueError(
            "group size G = 1: the group-relative advantage is undefined with one sample per prompt; "
            "sample G >= 2 responses per prompt"
        )
    rewards = rewards.astype(jnp.float32)
    centred = rewards - jnp.mean(rewards, axis=1, keepdims=True)
    if std is not None:
        ddof = 1 if std == "unbiased" else 0
        spread = jnp.sqrt(jnp.sum(centred**2, axis=1, keepdims=True) / (num_samples - ddof))
        centred = centred / (spread + eps)
    all_equal = jnp.max(rewards, axis=1, keepdims=True) == jnp.min(rewards, axis=1, keepdims=True)
    return jnp.where(all_equal, 0.0, centred)


def sequence_advantages(rewards, group_size: int | None = None, **kwargs) -> jax.Array:
    """Flat (N*G,) advantages in the prompt-major order of the rollout batch, ready for the losses' (B,) input."""
    return group_advantages(rewards, group_size, **kwargs).reshape(-1)
