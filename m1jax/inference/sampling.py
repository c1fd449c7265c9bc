"""Choosing the next token: greedy, or a draw from softmax(logits / temperature) after top-k and top-p filtering.

    top-k: keep the k highest logits (ties with the k-th are kept too)
    top-p: keep the smallest set of most probable tokens whose probability sums to at least p (the nucleus;
           the most probable token is always kept, ties with the last kept probability are kept too)

Filtering is applied in that order (temperature, top-k, top-p), as in transformers. Draws come from an explicit key
folded with the step number, so a generation is reproducible from its seed, and resumable mid-way.

One implementation, `filter_rows`, filters every row with its own temperature, top-k and top-p (one sort of the row
serves both filters); the static settings of `SamplingParams` (m1jax.generate: one setting for the batch) and the
per-row settings of the server's continuous batching (m1jax.serve: one setting per slot, `sample_rows`) both go
through it.
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


def _per_row(value, batch: int, dtype) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(value, dtype), (batch,))


def filter_rows(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """(B, V) logits -> (B, V) float32 logits / temperature with the tokens outside each row's top-k, then outside its
    nucleus of mass top-p, at -inf. temperature, top_k, top_p: (B,) arrays (one setting per row) or scalars.
    temperature 0 divides by 1 (greedy rows are not drawn from); top_k >= V and top_p >= 1 keep every token.

    One descending sort of each row: its k-th value is the top-k threshold, and the same sorted row (top-k applied)
    gives the probabilities of the more likely tokens, so the nucleus's last kept token is found there too.
    """
    batch, vocab = logits.shape
    temperature = _per_row(temperature, batch, jnp.float32)
    top_k = _per_row(top_k, batch, jnp.int32)
    top_p = _per_row(top_p, batch, jnp.float32)
    scaled = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    descending = -jnp.sort(-scaled, axis=-1)
    kth = jnp.take_along_axis(descending, jnp.clip(top_k - 1, 0, vocab - 1)[:, None], axis=-1)
    scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)
    descending = jnp.where(descending >= kth, descending, -jnp.inf)  # still sorted: top-k keeps a prefix
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # the probability of all more likely tokens
    # the nucleus's least likely kept logit (the first token always: its mass_before is 0 < p); ties with it stay
    threshold = jnp.min(jnp.where(mass_before < top_p[:, None], descending, jnp.inf), axis=-1, keepdims=True)
    # top_p >= 1: the whole vocabulary (float32 cumulative sums may round to 1 before the tail)
    keep = (scaled >= threshold) | (top_p[:, None] >= 1)
    return jnp.where(keep, scaled, -jnp.inf)


def top_k_filter(logits: jax.Array, k) -> jax.Array:
    """(B, V) -> (B, V): logits below the k-th largest of their row become -inf (k: an int or (B,) per row)."""
    return filter_rows(logits, 1.0, k, 1.0).astype(logits.dtype)


def top_p_filter(logits: jax.Array, p) -> jax.Array:
    """(B, V) -> (B, V): tokens outside the nucleus of probability p become -inf (p: a float or (B,) per row)."""
    if isinstance(p, (int, float)) and p >= 1:  # the whole vocabulary
        return logits
    return filter_rows(logits, 1.0, logits.shape[-1], p).astype(logits.dtype)


def filtered_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """(B, V) float32 logits / temperature, then top-k, then top-p."""
    if params.top_k is None and params.top_p is None:
        return logits.astype(jnp.float32) / params.temperature
    return filter_rows(logits, params.temperature, logits.shape[-1] if params.top_k is None else params.top_k,
                       1.0 if params.top_p is None else params.top_p)


def sample_tokens(logits: jax.Array, params: SamplingParams, key: jax.Array) -> jax.Array:
    """(B, V) logits -> (B,) int32 tokens. Greedy takes the first maximum (as torch.argmax)."""
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_logits(logits, params), axis=-1).astype(jnp.int32)


ROW_SAMPLING = ("greedy", "draw", "filter")  # the least general that covers a batch's rows: see `row_sampling`


def row_sampling(temperature, top_k, top_p, vocab: int) -> str:
    """The `sample_rows` mode for rows with these host-side settings (sequences of equal length): "greedy" when no
    row draws, "draw" when rows draw but none filters (top_k >= vocab, top_p >= 1), else "filter"."""
    drawn = [i for i, t in enumerate(temperature) if t > 0]
    if not drawn:
        return "greedy"
    return "filter" if any(top_k[i] < vocab or top_p[i] < 1 for i in drawn) else "draw"


def sample_rows(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                keys: jax.Array, mode: str = "filter") -> jax.Array:
    """(B, V) logits, one setting per row ((B,) temperature, top_k, top_p) and one key per row (B,) -> (B,) int32:
    the first maximum where temperature is 0, else a draw from the row's filtered logits with the row's key (so a
    row's draw does not depend on the other rows).

    mode (static, from `row_sampling` on the host): "greedy" skips the draws, "draw" the sort of the filters;
    "filter" does both. The rows' results are the same in every mode that covers them. The choice is the host's,
    not a `lax.cond` on the device: XLA's GPU runtime reads a conditional's predicate back to the host, which would
    make every decode step wait for the device before the next could be queued."""
    if mode not in ROW_SAMPLING:
        raise ValueError(f"mode must be one of {ROW_SAMPLING}, got {mode!r}")
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode == "greedy":
        return greedy
    drawn_rows = temperature > 0
    if mode == "filter":
        filtered = filter_rows(logits, temperature, top_k, top_p)
    else:
        filtered = logits.astype(jnp.float32) / jnp.where(drawn_rows, temperature, 1.0)[:, None]
    drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
    return jnp.where(drawn_rows, drawn, greedy)
