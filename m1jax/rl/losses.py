"""Policy-gradient losses for RL on verifiable rewards: CISPO (MiniMax-M1) and its baselines PPO-clip, GRPO, DAPO.

Every loss is a pure, jit-able function of per-token quantities over a batch of B sampled responses padded to
T positions:

    logprobs      (B, T)  log pi_theta(o_t | ...) of the sampled tokens under the policy being trained
    old_logprobs  (B, T)  the same under the policy that sampled them (pi_old), treated as constants
    advantages    (B,) or (B, T)  per-sequence advantages (broadcast over T) or per-token ones
    mask          (B, T)  1 on response tokens, 0 on padding (and prompt positions)

and returns ``(loss, metrics)``: ``loss`` is the quantity to MINIMISE, i.e. -J for the objective J written in
each docstring, and ``metrics`` is a dict of float32 scalars. With r = exp(logprobs - old_logprobs):

    clip_high_frac  fraction of response tokens with r > 1 + eps_high
    clip_low_frac   fraction of response tokens with r < 1 - eps_low (0 when there is no lower bound)
    dropped_frac    fraction of response tokens whose gradient the clipping zeroes (A > 0 and r above the band,
                    or A < 0 and r below it); always 0 for plain CISPO, which keeps every token
    ratio_mean      mean of r over response tokens
    approx_kl       k3 estimate of KL(pi_old || pi_theta): mean of (r - 1) - log r over response tokens
    num_tokens      number of response tokens in the batch

Padding never matters: entries where ``mask`` is 0 are replaced before any arithmetic, so their values (even
inf/nan) change neither the loss nor its gradient. A batch without response tokens gives loss 0.

Normalisation: CISPO, DAPO and PPO-clip are token-level (sum over all response tokens of the batch divided by
their count, so long responses weigh more); GRPO is sample-level (mean over each response's tokens, then mean
over the responses that have at least one token), as written in the GRPO paper.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

CISPO_EPS_HIGH = 0.28  # M1 tunes only eps_high and publishes no value; 0.28 is DAPO's clip-higher bound
PPO_EPS = 0.2
DAPO_EPS_LOW = 0.2
DAPO_EPS_HIGH = 0.28
GRPO_BETA = 0.04  # KL coefficient of the GRPO paper

Metrics = dict[str, jax.Array]


class TokenTerms(NamedTuple):
    """Per-token quantities shared by all losses; padding entries are neutral (0, or 1 for the ratio)."""

    mask: jax.Array  # (B, T) float32, 1 on response tokens
    logprobs: jax.Array  # (B, T) log pi_theta, 0 on padding
    log_ratio: jax.Array  # (B, T) logprobs - old_logprobs, 0 on padding
    ratio: jax.Array  # (B, T) exp(log_ratio), 1 on padding
    advantages: jax.Array  # (B, T) advantages broadcast over T, 0 on padding
    num_tokens: jax.Array  # () number of response tokens


def _check_shape(name: str, value: jax.Array, expected: tuple[int, ...], hint: str) -> None:
    if tuple(value.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {expected}: {hint}")


def token_terms(logprobs, old_logprobs, advantages, mask) -> TokenTerms:
    """Validate shapes, broadcast advantages (B,) -> (B, T) and neutralise padding, once for every loss."""
    logprobs, old_logprobs = jnp.asarray(logprobs), jnp.asarray(old_logprobs)
    advantages, mask = jnp.asarray(advantages), jnp.asarray(mask)
    if logprobs.ndim != 2:
        raise ValueError(
            f"logprobs has shape {tuple(logprobs.shape)}, expected (B, T): one row of per-token log-probabilities "
            "per sampled response"
        )
    bt = tuple(logprobs.shape)
    _check_shape("old_logprobs", old_logprobs, bt, "pass the sampling policy's log-probs of the same tokens")
    _check_shape("mask", mask, bt, "pass 1 on response tokens and 0 on padding, one entry per logprob")
    if advantages.shape == bt[:1]:
        advantages = jnp.broadcast_to(advantages[:, None], bt)
    else:
        _check_shape("advantages", advantages, bt, f"pass one advantage per sequence {bt[:1]} or per token {bt}")
    valid = mask.astype(bool)
    logprobs = jnp.where(valid, logprobs.astype(jnp.float32), 0.0)
    log_ratio = jnp.where(valid, logprobs - old_logprobs.astype(jnp.float32), 0.0)
    return TokenTerms(
        mask=valid.astype(jnp.float32),
        logprobs=logprobs,
        log_ratio=log_ratio,
        ratio=jnp.exp(log_ratio),
        advantages=jnp.where(valid, advantages.astype(jnp.float32), 0.0),
        num_tokens=jnp.sum(valid.astype(jnp.float32)),
    )


def _check_eps(name: str, value: float | None, allow_none: bool = False) -> None:
    if value is None:
        if not allow_none:
            raise ValueError(f"{name} is None, expected a float >= 0 (the half-width of the clip band)")
        return
    if isinstance(value, (int, float)) and not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name}={value!r}, expected a finite float >= 0 (the half-width of the clip band)")


def _token_mean(values: jax.Array, terms: TokenTerms) -> jax.Array:
    """Sum over response tokens of the batch divided by their count (0 for an empty batch)."""
    return jnp.sum(values * terms.mask) / jnp.maximum(terms.num_tokens, 1.0)


def _sample_mean(values: jax.Array, terms: TokenTerms) -> jax.Array:
    """Mean over each response's tokens, then over the responses with at least one token."""
    lengths = jnp.sum(terms.mask, axis=1)
    per_sequence = jnp.sum(values * terms.mask, axis=1) / jnp.maximum(lengths, 1.0)
    return jnp.sum(per_sequence) / jnp.maximum(jnp.sum(lengths > 0), 1)


def _lower_bound(eps_low: float | None) -> float:
    return -jnp.inf if eps_low is None else 1.0 - eps_low


def ppo_dropped_tokens(terms: TokenTerms, eps_low: float | None, eps_high: float) -> jax.Array:
    """(B, T) bool: tokens whose PPO-clip gradient is zero.

    That is A > 0 and r > 1 + eps_high, or A < 0 and r < 1 - eps_low (never, for eps_low None), on response
    tokens. The complement is M1's token mask M of the unified formulation.
    """
    above = (terms.advantages > 0) & (terms.ratio > 1.0 + eps_high)
    below = (terms.advantages < 0) & (terms.ratio < _lower_bound(eps_low))
    return (above | below) & terms.mask.astype(bool)


def _ratio_metrics(terms: TokenTerms, eps_low: float | None, eps_high: float, dropped: jax.Array | None) -> Metrics:
    high = (terms.ratio > 1.0 + eps_high).astype(jnp.float32)
    low = (terms.ratio < _lower_bound(eps_low)).astype(jnp.float32)
    zero = jnp.zeros((), jnp.float32)
    return {
        "clip_high_frac": _token_mean(high, terms),
        "clip_low_frac": _token_mean(low, terms),
        "dropped_frac": zero if dropped is None else _token_mean(dropped.astype(jnp.float32), terms),
        "ratio_mean": _token_mean(terms.ratio, terms),
        "approx_kl": _token_mean(terms.ratio - 1.0 - terms.log_ratio, terms),
        "num_tokens": terms.num_tokens,
    }


def _clipped_surrogate(terms: TokenTerms, eps_low: float, eps_high: float) -> jax.Array:
    """(B, T) PPO surrogate min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)."""
    clipped = jnp.clip(terms.ratio, 1.0 - eps_low, 1.0 + eps_high)
    return jnp.minimum(terms.ratio * terms.advantages, clipped * terms.advantages)


def cispo_loss(
    logprobs, old_logprobs, advantages, mask, *, eps_low: float | None = None, eps_high: float = CISPO_EPS_HIGH,
    unified: bool = False,
) -> tuple[jax.Array, Metrics]:
    """CISPO (MiniMax-M1): clip the importance-sampling weight, never the token.

    J = 1/sum_i |o_i| * sum_i sum_t sg(clip(r_it, 1 - eps_low, 1 + eps_high)) * A_it * log pi_theta(o_it)

    The clipped weight is a constant (stop-gradient), so every response token contributes A * w * grad log pi,
    including those whose ratio left the band, which PPO/GRPO/DAPO would drop. ``eps_low=None`` (the paper's
    setting: a very large eps_low) means no lower bound. ``unified=True`` is the paper's unified formulation:
    the summand is multiplied by the token mask M (0 where PPO-clip would drop the token, see
    ``ppo_dropped_tokens``, with the same eps_low/eps_high; else 1), which recovers PPO-style token dropping.
    Token-level normalisation. Returns (-J, metrics).
    """
    _check_eps("eps_low", eps_low, allow_none=True)
    _check_eps("eps_high", eps_high)
    terms = token_terms(logprobs, old_logprobs, advantages, mask)
    weight = jax.lax.stop_gradient(jnp.clip(terms.ratio, _lower_bound(eps_low), 1.0 + eps_high))
    summand = weight * terms.advantages * terms.logprobs
    dropped = None
    if unified:
        dropped = ppo_dropped_tokens(terms, eps_low, eps_high)
        summand = jnp.where(dropped, 0.0, summand)
    loss = -_token_mean(summand, terms)
    return loss, {"loss": loss, **_ratio_metrics(terms, eps_low, eps_high, dropped)}


def ppo_clip_loss(logprobs, old_logprobs, advantages, mask, *, eps: float = PPO_EPS) -> tuple[jax.Array, Metrics]:
    """Plain PPO-clip policy loss (no value or entropy terms), token-level mean.

    J = 1/sum_i |o_i| * sum_i sum_t min(r_it A_it, clip(r_it, 1 - eps, 1 + eps) A_it). Returns (-J, metrics).
    """
    _check_eps("eps", eps)
    terms = token_terms(logprobs, old_logprobs, advantages, mask)
    loss = -_token_mean(_clipped_surrogate(terms, eps, eps), terms)
    metrics = _ratio_metrics(terms, eps, eps, ppo_dropped_tokens(terms, eps, eps))
    return loss, {"loss": loss, **metrics}


def grpo_loss(
    logprobs, old_logprobs, advantages, mask, *, eps: float = PPO_EPS, ref_logprobs=None, beta: float = GRPO_BETA,
) -> tuple[jax.Array, Metrics]:
    """GRPO: PPO-clip on group-normalised advantages, optional KL to a reference policy, sample-level mean.

    J = 1/G sum_i 1/|o_i| sum_t [min(r_it A_it, clip(r_it, 1 - eps, 1 + eps) A_it) - beta * D_it]
    with the k3 estimator D_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1 of KL(pi_theta || pi_ref),
    ``ref_logprobs`` (B, T) the reference policy's log-probs (None: no KL term). The mean over i runs over the
    responses that have at least one token. Returns (-J, metrics); metrics add ``kl_ref`` (token mean of D).
    """
    _check_eps("eps", eps)
    terms = token_terms(logprobs, old_logprobs, advantages, mask)
    summand = _clipped_surrogate(terms, eps, eps)
    metrics = _ratio_metrics(terms, eps, eps, ppo_dropped_tokens(terms, eps, eps))
    if ref_logprobs is not None:
        ref_logprobs = jnp.asarray(ref_logprobs)
        _check_shape("ref_logprobs", ref_logprobs, terms.mask.shape, "pass the reference policy's log-probs, or None")
        ref_minus_new = jnp.where(terms.mask > 0, ref_logprobs.astype(jnp.float32) - terms.logprobs, 0.0)
        kl = jnp.exp(ref_minus_new) - ref_minus_new - 1.0
        summand = summand - beta * kl
        metrics["kl_ref"] = _token_mean(kl, terms)
    loss = -_sample_mean(summand, terms)
    return loss, {"loss": loss, **metrics}


def dapo_loss(
    logprobs, old_logprobs, advantages, mask, *, eps_low: float = DAPO_EPS_LOW, eps_high: float = DAPO_EPS_HIGH,
) -> tuple[jax.Array, Metrics]:
    """DAPO's policy loss: PPO-clip with a decoupled, higher upper bound (clip-higher), token-level mean, no KL.

    J = 1/sum_i |o_i| * sum_i sum_t min(r_it A_it, clip(r_it, 1 - eps_low, 1 + eps_high) A_it).
    DAPO's other two ingredients act on the batch and the reward: ``dynamic_sampling_filter`` and
    ``overlong_penalty``. Returns (-J, metrics).
    """
    _check_eps("eps_low", eps_low)
    _check_eps("eps_high", eps_high)
    terms = token_terms(logprobs, old_logprobs, advantages, mask)
    loss = -_token_mean(_clipped_surrogate(terms, eps_low, eps_high), terms)
    metrics = _ratio_metrics(terms, eps_low, eps_high, ppo_dropped_tokens(terms, eps_low, eps_high))
    return loss, {"loss": loss, **metrics}


def dynamic_sampling_filter(rewards) -> jax.Array:
    """DAPO dynamic sampling: (N,) bool keep-mask over groups, False where all G rewards are equal.

    rewards: (N, G), the G sampled responses of each of N prompts. A group with zero reward spread has zero
    group-normalised advantage everywhere and so no gradient; DAPO over-samples and drops such groups.
    """
    rewards = jnp.asarray(rewards)
    if rewards.ndim != 2:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)}, expected (N, G): one row of G rewards per prompt")
    return jnp.max(rewards, axis=1) > jnp.min(rewards, axis=1)


def overlong_penalty(lengths, max_len: int, cache_len: int) -> jax.Array:
    """DAPO soft overlong punishment, (B,) float32 added to the task reward of each response.

    With L_max = max_len and L_cache = cache_len, for a response of |y| tokens:
        0                                   if |y| <= L_max - L_cache
        ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max   (falls linearly from 0 to -1)
        -1                                  if |y| > L_max
    """
    if not (isinstance(max_len, int) and isinstance(cache_len, int) and 0 < cache_len <= max_len):
        raise ValueError(
            f"max_len={max_len!r}, cache_len={cache_len!r}: expected integers with 0 < cache_len <= max_len "
            "(cache_len is the length of the soft-penalty interval just below max_len)"
        )
    lengths = jnp.asarray(lengths)
    if lengths.ndim != 1:
        raise ValueError(f"lengths has shape {tuple(lengths.shape)}, expected (B,): one response length per row")
    lengths = lengths.astype(jnp.float32)
    soft_start = max_len - cache_len
    soft = (soft_start - lengths) / cache_len
    return jnp.where(lengths <= soft_start, 0.0, jnp.where(lengths <= max_len, soft, -1.0)).astype(jnp.float32)
