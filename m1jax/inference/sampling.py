"""Choosing the next token: greedy, or a draw from softmax(logits / temperature) after top-k and top-p filtering.

    top-k: keep the k highest logits (ties with the k-th are kept too)
    top-p: keep the smallest set of most probable tokens whose probability sums to at least p (the nucleus;
           the most probable token is always kept, ties with the last kept probability are kept too)

Filtering is applied in that order (temperature, top-k, top-p), as in transformers. Draws come from an explicit key
folded with the step number, so a generation is reproducible from its seed, and resumable mid-way.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy (top_k and top_p are then ignored). Hashable: a static argument of jit."""
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool)
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.top_p is not None and (not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """(B, V) -> (B, V): logits below the k-th largest of their row become -inf."""
    k = min(k, logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][:, -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """(B, V) -> (B, V): tokens outside the nucleus of probability p become -inf."""
    if p >= 1:  # the whole vocabulary (float32 cumulative sums may round to 1 before the tail)
        return logits
    probs = jax.nn.softmax(logits, axis=-1)
    sorted_probs = jnp.sort(probs, axis=-1)[:, ::-1]
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # probability of all more likely tokens
    kept = mass_before < p  # the first token always (mass 0 < p)
    threshold = jnp.min(jnp.where(kept, sorted_probs, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(probs >= threshold, logits, -jnp.inf)


def filtered_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """(B, V) float32 logits / temperature, then top-k, then top-p."""
    logits = logits.astype(jnp.float32) / params.temperature
    if params.top_k is not None:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p is not None:
        logits = top_p_filter(logits, params.top_p)
    return logits


def sample_tokens(logits: jax.Array, params: SamplingParams, key: jax.Array) -> jax.Array:
    """(B, V) logits -> (B,) int32 tokens. Greedy takes the first maximum (as torch.argmax)."""
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_logits(logits, params), axis=-1).astype(jnp.int32)
