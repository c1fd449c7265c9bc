"""The device steps of continuous batching: prefill one request, insert it into a slot, decode every slot one token.

JetStream's split, on m1jax's cache (one shared write index, a start slot per row):

    small = prefill_chunk(model, params, small, ids)       one request, batch 1, a cache of the same S slots
    slots = insert(slots, small, first_token, b, ...)       its keys/values and lightning state into row b
    slots, out = decode_step(model, params, slots)          every live row draws one token

A row b holds its request's tokens at slots start_b .. index-1 (positions slot - start_b, as in a left-padded
static batch), so a row inserted late simply has a later start. Rows that are free or finished have live = False:
they still run (fixed shapes) but are masked as padding, so they change no other row and count in no statistic.

Per-row sampling (each slot has its own temperature, top-k, top-p and seed) follows m1jax.inference.sampling:
logits / T, keep the top-k (ties kept), keep the nucleus of mass p (the most probable token always); a row's draw
uses fold_in(key(seed), step), so a seeded request draws the same tokens whatever its neighbours.

Per-row routing: the model's routing statistics are summed over the batch, so the decode step intercepts each MoE
call (flax's `intercept_methods`) and recomputes the router's choices from the MoE's input and gate, giving
tokens_per_expert and expert_calls (B, L, E) per row. Their sum over rows equals the model's own counts.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from m1jax.inference.cache import Cache, insert_row, shift_slots
from m1jax.layers.moe import MoE
from m1jax.layers.moe_core import route, skip_below_threshold
from m1jax.model import M1ForCausalLM

TOP_LOGPROBS = 20  # log-probabilities of the most likely tokens, returned for every drawn token (OpenAI's limit)


@flax.struct.dataclass
class Slots:
    """The running batch. cache (B rows); last (B,) int32 the token each row feeds next; live (B,) bool;
    steps (B,) int32 tokens drawn per row (the rng step); keys (B, 2) uint32 key data of each row's seed;
    temperature (B,) float32 (0: greedy); top_k (B,) int32 (V: off); top_p (B,) float32 (1: off);
    counts, calls (B, L, E) float32: each row's routed and computed (token, expert) pairs;
    bias (B, V) float32: added to a row's logits before sampling (OpenAI's logit_bias; log-probs use raw logits)."""
    cache: Cache
    last: jax.Array
    live: jax.Array
    steps: jax.Array
    keys: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    counts: jax.Array
    calls: jax.Array
    bias: jax.Array


# ----- sampling, one setting per row -----
def filter_rows(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """(B, V) logits -> (B, V) float32 logits / T with tokens outside each row's top-k and nucleus at -inf."""
    vocab = logits.shape[-1]
    scaled = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    descending = -jnp.sort(-scaled, axis=-1)
    kth = jnp.take_along_axis(descending, jnp.clip(top_k - 1, 0, vocab - 1)[:, None], axis=-1)
    scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)
    probs = jax.nn.softmax(scaled, axis=-1)
    sorted_probs = -jnp.sort(-probs, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    threshold = jnp.min(jnp.where(mass_before < top_p[:, None], sorted_probs, jnp.inf), axis=-1, keepdims=True)
    keep = (probs >= threshold) | (top_p[:, None] >= 1)
    return jnp.where(keep, scaled, -jnp.inf)


def sample_rows(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, keys: jax.Array,
                steps: jax.Array) -> jax.Array:
    """(B, V) logits -> (B,) int32: argmax where temperature is 0, else a draw with key fold_in(key_b, step_b)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_rows(logits, temperature, top_k, top_p)
    row_keys = jax.vmap(lambda k, s: jax.random.fold_in(jax.random.wrap_key_data(k), s))(keys, steps)
    drawn = jax.vmap(lambda k, x: jax.random.categorical(k, x))(row_keys, filtered).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


def top_logprobs(logits: jax.Array, chosen: jax.Array, n: int = TOP_LOGPROBS):
    """(..., V) logits, (...) chosen ids -> (chosen log-prob (...), top ids (..., n) int32, top log-probs (..., n))."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    values, ids = jax.lax.top_k(logp, min(n, logits.shape[-1]))
    return jnp.take_along_axis(logp, chosen[..., None], axis=-1)[..., 0], ids.astype(jnp.int32), values


# ----- per-row routing -----
def routed_per_row(model: M1ForCausalLM, params: Any, ids: jax.Array, **kwargs):
    """model.apply with every MoE call intercepted. Returns (output, counts (B, L, E), calls (B, L, E)) float32:
    per row, the router's (token, expert) choices over its real tokens, and those an expert computed."""
    rows: list[tuple[jax.Array, jax.Array]] = []
    batch = ids.shape[0]

    def interceptor(next_fun, args, kw, context):
        out = next_fun(*args, **kw)
        if isinstance(context.module, MoE) and context.method_name == "__call__":
            cfg = context.module.config
            x = args[0]
            mask = args[1] if len(args) > 1 else kw.get("token_mask")
            flat = x.reshape(-1, x.shape[-1])
            routing = route(flat, context.module.get_variable("params", "gate"), cfg.experts_per_token)
            _, skipped = skip_below_threshold(routing.weights, cfg.expert_threshold)
            real = jnp.ones(flat.shape[:1], bool) if mask is None else mask.reshape(-1).astype(bool)
            one_hot = jax.nn.one_hot(routing.experts, cfg.num_experts, dtype=jnp.float32) * real[:, None, None]
            per_row = lambda a: a.reshape(batch, -1, cfg.num_experts).sum(1)
            rows.append((per_row(one_hot), per_row(one_hot * (~skipped)[..., None])))
        return out

    with nn.intercept_methods(interceptor):
        out = model.apply({"params": params}, ids, **kwargs)
    if len(rows) != model.config.num_layers:
        raise RuntimeError(f"intercepted {len(rows)} MoE calls for {model.config.num_layers} layers")
    counts = jnp.stack([r[0] for r in rows], axis=1)
    calls = jnp.stack([r[1] for r in rows], axis=1)
    return out, counts, calls


# ----- the steps (jitted with the model static; the big state is donated) -----
def reset_row_cache(cache: Cache, start: jax.Array) -> Cache:
    """A one-row cache ready for a new prompt: index 0, the given start, lightning states zero (keys may be stale:
    slots at or beyond the index are never visible)."""
    layers = tuple({"state": jnp.zeros_like(e["state"])} if "state" in e else e for e in cache.layers)
    return cache.replace(layers=layers, index=jnp.zeros((), jnp.int32), start=jnp.reshape(start, (1,)))


def prefill_chunk(model: M1ForCausalLM, with_logprobs: bool, params, cache: Cache, ids: jax.Array,
                  targets: jax.Array):
    """ids (1, C) into the one-row cache. Returns (cache, last logits (V,), routing (counts, calls) (L, E),
    and with_logprobs: (log p(targets) (C,), top ids (C, n), top log-probs (C, n)) else None)."""
    out = model.apply({"params": params}, ids, cache=cache, last_logits_only=not with_logprobs)
    logits = out.logits[0]
    extra = top_logprobs(logits, targets[0]) if with_logprobs else None
    routing = (out.routing["tokens_per_expert"], out.routing.get("expert_calls", out.routing["tokens_per_expert"]))
    return out.cache, logits[-1], routing, extra


def insert(slots: Slots, row: Cache, slot: jax.Array, first: jax.Array, key: jax.Array, temperature: jax.Array,
           top_k: jax.Array, top_p: jax.Array, bias: jax.Array, counts: jax.Array, calls: jax.Array) -> Slots:
    """Put a prefilled request into row `slot`: its cache (aligned so its prompt ends at the shared index), the
    first drawn token (fed at the next step), its sampling settings and the prefill's routing counts (L, E)."""
    put = lambda a, v: jax.lax.dynamic_update_index_in_dim(a, jnp.asarray(v, a.dtype), slot, axis=0)
    return slots.replace(cache=insert_row(slots.cache, row, slot), last=put(slots.last, first),
                         live=put(slots.live, True), steps=put(slots.steps, 1), keys=put(slots.keys, key),
                         temperature=put(slots.temperature, temperature), top_k=put(slots.top_k, top_k),
                         top_p=put(slots.top_p, top_p), bias=put(slots.bias, bias), counts=put(slots.counts, counts),
                         calls=put(slots.calls, calls))


def release(slots: Slots, slot: jax.Array) -> Slots:
    """Row `slot` stops taking part (its tokens become padding)."""
    return slots.replace(live=jax.lax.dynamic_update_index_in_dim(slots.live, False, slot, axis=0))


def shift(slots: Slots, delta: jax.Array) -> Slots:
    return slots.replace(cache=shift_slots(slots.cache, delta))


def decode_step(model: M1ForCausalLM, params, slots: Slots):
    """Every row feeds its last token and draws the next. Returns (slots, (token (B,), log-prob (B,),
    top ids (B, n), top log-probs (B, n))). Rows that are not live draw too; the host ignores them."""
    live = slots.live[:, None].astype(jnp.int32)
    out, counts, calls = routed_per_row(model, params, slots.last[:, None], segment_ids=live, cache=slots.cache)
    logits = out.logits[:, -1]
    token = sample_rows(logits + slots.bias, slots.temperature, slots.top_k, slots.top_p, slots.keys, slots.steps)
    logp, top_ids, top_lp = top_logprobs(logits, token)
    new = slots.replace(cache=out.cache, last=jnp.where(slots.live, token, slots.last), steps=slots.steps + 1,
                        counts=slots.counts + counts, calls=slots.calls + calls)
    return new, (token, logp, top_ids, top_lp)


def first_token(logits: jax.Array, temperature, top_k, top_p, bias, key) -> tuple[jax.Array, Any]:
    """The prefill's last logits (V,) -> (token (), (log-prob, top ids, top log-probs)) for one request (step 0)."""
    token = sample_rows((logits + bias)[None], temperature[None], top_k[None], top_p[None], key[None],
                        jnp.zeros((1,), jnp.int32))
    return token[0], jax.tree.map(lambda a: a[0], top_logprobs(logits[None], token))


JITTED = {
    "reset": jax.jit(reset_row_cache, donate_argnums=0),
    "prefill": jax.jit(prefill_chunk, static_argnums=(0, 1), donate_argnums=3),
    "first": jax.jit(first_token),
    "insert": jax.jit(insert, donate_argnums=0),
    "release": jax.jit(release, donate_argnums=0),
    "shift": jax.jit(shift, donate_argnums=0),
    "decode": jax.jit(decode_step, static_argnums=0, donate_argnums=2),
}
