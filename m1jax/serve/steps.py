"""The device steps of continuous batching: prefill a group of requests, insert them into slots, decode K tokens.

JetStream's split, on m1jax's cache (one shared write index, a start slot per row):

    rows = prefill_chunk(model, params, rows, ids)          P waiting requests at once (a P-row cache, left-padded)
    first = first_tokens(rows' last logits, settings)        each request's first token (step 0 of its seed)
    slots = insert(slots, rows, placement, first, ...)       each row's keys/values and lightning state into its slot
    slots, out = decode_steps(model, params, slots)          up to K tokens for every live row, in one device call

A slot b holds its request's tokens at cache slots start_b .. index-1 (positions slot - start_b, as in a left-padded
static batch), so a row inserted late simply has a later start. Rows that are free or finished have live = False:
they still run (fixed shapes) but are masked as padding, so they change no other row and count in no statistic.

Multi-step decode: `decode_steps` runs a loop of exactly K steps. Each step feeds every row its last
token, draws the next one with the row's own settings (`m1jax.inference.sampling.sample_rows`), and ends a row on
the device when it draws one of its stop ids or reaches its length (live becomes False: the following steps treat it
as padding). The trip count is static on purpose: a loop that ended early once no row is live would be a
data-dependent `while`, whose condition XLA's GPU runtime copies to the host every step, so dispatching the call
would hold the host for the call's whole duration (measured: 24 ms of a 16-step call). The K tokens of every row
come back in one transfer, with a mask of the steps in which each row was live; the host applies stop strings,
streams, and admits new requests between two calls. A stop string found on the host ends its row at that token: the
tokens the device drew after it are discarded, and the per-step routing counts of those steps (`step_counts`, kept on
the device) are subtracted.

Per-row routing: the model's statistics are summed over its batch, so each MoE call is intercepted (flax's
`intercept_methods`) and the MoE's own `routing_stats` (m1jax.layers.moe_core) is evaluated row by row on the same
router choices, expert_threshold skips and capacity drops the MoE computes (its routing, skip and capacity functions
on its input). Per row: tokens_per_expert (the router's choices over the row's real tokens, dropped ones included,
as the model counts them) and expert_calls (the ones computed). Their sum over rows equals the model's own counts.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from m1jax.inference.cache import Cache, shift_slots
from m1jax.inference.sampling import sample_rows
from m1jax.layers.moe import MoE
from m1jax.layers.moe_core import Routing, expert_capacity, over_capacity, route, routing_stats, skip_below_threshold
from m1jax.model import M1ForCausalLM

TOP_LOGPROBS = 20  # log-probabilities of the most likely tokens, returned for every drawn token (OpenAI's limit)


@flax.struct.dataclass
class Slots:
    """The running batch. cache (B rows); last (B,) int32 the token each row feeds next; live (B,) bool;
    steps (B,) int32 tokens drawn per row (the rng step); keys (B, 2) uint32 key data of each row's seed;
    temperature (B,) float32 (0: greedy); top_k (B,) int32 (V: off); top_p (B,) float32 (1: off);
    counts, calls (B, L, E) float32: each row's routed and computed (token, expert) pairs;
    bias (B, V) float32: added to a row's logits before sampling (OpenAI's logit_bias; log-probs use raw logits);
    stop (B, V) bool: the row's stop ids; remaining (B,) int32: tokens the row may still draw."""
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
    stop: jax.Array
    remaining: jax.Array


class Drawn(NamedTuple):
    """What decode_steps returns to the host. tokens (K, B) int32; emitted (K, B) bool: the row was live at that step
    (its token counts); with logprobs: logp (K, B), top_ids (K, B, n), top_logp (K, B, n), else None;
    counts, calls (B, L, E) float32: each row's routing counts after the call (read when a request ends);
    step_counts, step_calls (K, B, L, E) float32: each step's (read only to take back the steps after a stop
    string). The host reads them after the next call was launched: being this call's outputs, they are ready
    without waiting for it."""
    tokens: jax.Array
    emitted: jax.Array
    logp: jax.Array | None
    top_ids: jax.Array | None
    top_logp: jax.Array | None
    counts: jax.Array
    calls: jax.Array
    step_counts: jax.Array
    step_calls: jax.Array


def top_logprobs(logits: jax.Array, chosen: jax.Array, n: int = TOP_LOGPROBS):
    """(..., V) logits, (...) chosen ids -> (chosen log-prob (...), top ids (..., n) int32, top log-probs (..., n)).
    n = 0 skips the top-k over the vocabulary (the ids and log-probs are then empty)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if n == 0:
        ids, values = jnp.zeros(logp.shape[:-1] + (0,), jnp.int32), jnp.zeros(logp.shape[:-1] + (0,), jnp.float32)
    else:
        values, ids = jax.lax.top_k(logp, min(n, logits.shape[-1]))
    return jnp.take_along_axis(logp, chosen[..., None], axis=-1)[..., 0], ids.astype(jnp.int32), values


def row_keys(keys: jax.Array, steps: jax.Array) -> jax.Array:
    """(B, 2) uint32 key data, (B,) steps -> (B,) typed keys fold_in(key_b, step_b)."""
    return jax.vmap(lambda k, s: jax.random.fold_in(jax.random.wrap_key_data(k), s))(keys, steps)


# ----- per-row routing -----
def moe_rows(module: MoE, x: jax.Array, token_mask: jax.Array | None):
    """The MoE's routing statistics of its input x (B, T, hidden), row by row: (tokens_per_expert, expert_calls),
    each (B, E) float32. The router's choices, expert_threshold skips and capacity drops are computed by the same
    moe_core functions, on the same input and gate, as the MoE layer computes them."""
    cfg, policy = module.config, module.policy
    batch, num_experts, k = x.shape[0], cfg.num_experts, cfg.experts_per_token
    flat = x.reshape(-1, x.shape[-1])
    routing = route(flat, module.get_variable("params", "gate"), k)
    _, skipped = skip_below_threshold(routing.weights, policy.expert_threshold)
    mask = jnp.ones(flat.shape[:1], bool) if token_mask is None else token_mask.reshape(-1).astype(bool)
    dropped = jnp.zeros(skipped.shape, bool)
    if policy.capacity_factor is not None:
        calls = jnp.where(skipped | ~mask[:, None], num_experts, routing.experts)
        capacity = expert_capacity(flat.shape[0], k, num_experts, policy.capacity_factor)
        dropped = over_capacity(calls, capacity, num_experts)
    by_row = lambda a: a.reshape((batch, -1) + a.shape[1:])
    stats = jax.vmap(routing_stats)(Routing(*map(by_row, routing)), by_row(mask), by_row(skipped), by_row(dropped))
    return stats["tokens_per_expert"], stats["expert_calls"]


def routed_per_row(model: M1ForCausalLM, params: Any, ids: jax.Array, **kwargs):
    """model.apply with a cache (its layer groups unrolled, so each MoE call is seen once, outside any scan) and
    every MoE call intercepted. Returns (output, counts (B, L, E), calls (B, L, E)) float32: per row, the router's
    (token, expert) choices over its real tokens, and those an expert computed."""
    rows: list[tuple[jax.Array, jax.Array]] = []

    def interceptor(next_fun, args, kw, context):
        out = next_fun(*args, **kw)
        if isinstance(context.module, MoE) and context.method_name == "__call__":
            mask = args[1] if len(args) > 1 else kw.get("token_mask")
            rows.append(moe_rows(context.module, args[0], mask))
        return out

    with nn.intercept_methods(interceptor):
        out = model.apply({"params": params}, ids, **kwargs)
    if len(rows) != model.config.num_layers:
        raise RuntimeError(f"intercepted {len(rows)} MoE calls for {model.config.num_layers} layers (pass a cache)")
    counts = jnp.stack([r[0] for r in rows], axis=1)
    calls = jnp.stack([r[1] for r in rows], axis=1)
    return out, counts, calls


# ----- prefill (jitted with the model static; the big state is donated) -----
def reset_rows(cache: Cache, start: jax.Array) -> Cache:
    """A P-row cache ready for new prompts: index 0, the given starts (P,), lightning states zero (keys may be stale:
    slots at or beyond the index are never visible), fresh (its first chunk attends within itself)."""
    layers = tuple({"state": jnp.zeros_like(e["state"])} if "state" in e else e for e in cache.layers)
    return cache.replace(layers=layers, index=jnp.zeros((), jnp.int32), start=start.astype(jnp.int32), fresh=True)


def prefill_chunk(model: M1ForCausalLM, with_logprobs: bool, params, cache: Cache, tokens: jax.Array):
    """tokens (P, C + 1): a chunk's ids (P, C) and, one column further, each one's next token (0 past the prompts:
    the targets of the log-probs; one array, one transfer), ids into the P-row cache. Returns (cache, last logits
    (P, V), routing (counts, calls) (P, L, E), and with_logprobs: (log p(targets) (P, C), top ids (P, C, n), top
    log-probs (P, C, n)) else None)."""
    ids, targets = tokens[:, :-1], tokens[:, 1:]
    out, counts, calls = routed_per_row(model, params, ids, cache=cache, last_logits_only=not with_logprobs)
    extra = top_logprobs(out.logits, targets) if with_logprobs else None
    return out.cache, out.logits[:, -1], (counts, calls), extra


def first_tokens(with_logprobs: bool, sampling: str, logits: jax.Array, temperature, top_k, top_p, bias, keys):
    """The prefill's last logits (P, V) -> (tokens (P,), (log-prob, top ids, top log-probs) or None): step 0 of each
    row's seed. sampling: sample_rows's mode for these rows."""
    token = sample_rows(logits + bias, temperature, top_k, top_p, row_keys(keys, jnp.zeros_like(top_k)), sampling)
    return token, (top_logprobs(logits, token) if with_logprobs else None)


SETTINGS_COLUMNS = 6  # per row in admission.host_settings' array: temperature, top_k, top_p, key (2), start


def unpack_settings(layout: tuple[int, int, int], packed: jax.Array):
    """admission.host_settings' int32 array of a group's P rows, laid out as `layout` (P, bias pairs n, stop pairs
    m) -> (temperature (P,) float32, top_k (P,) int32, top_p (P,) float32, keys (P, 2) uint32, bias_at (n, 2),
    bias (n,) float32, stop_at (m, 2), start (P,) int32): the same bits as the host's arrays."""
    rows, biases, stops = layout
    per_row = packed[:rows * SETTINGS_COLUMNS].reshape(rows, SETTINGS_COLUMNS)
    triples = packed[rows * SETTINGS_COLUMNS:rows * SETTINGS_COLUMNS + 3 * biases].reshape(biases, 3)
    stop_at = packed[rows * SETTINGS_COLUMNS + 3 * biases:].reshape(stops, 2)
    as_float = lambda x: jax.lax.bitcast_convert_type(x, jnp.float32)
    return (as_float(per_row[:, 0]), per_row[:, 1], as_float(per_row[:, 2]),
            jax.lax.bitcast_convert_type(per_row[:, 3:5], jnp.uint32), triples[:, :2], as_float(triples[:, 2]),
            stop_at, per_row[:, 5])


def row_settings(vocab: int, layout: tuple[int, int, int], packed: jax.Array):
    """A prefill group's P rows' settings from the host (admission.host_settings: one int32 array, `unpack_settings`)
    -> (temperature, top_k, top_p, bias (P, V) float32, keys, stop (P, V) bool): bias[r, i] = value and stop[r, i] =
    True for each (r, i) pair of the bias and stop pairs (rows r >= P are padding: dropped)."""
    temperature, top_k, top_p, keys, bias_at, bias, stop_at, _ = unpack_settings(layout, packed)
    rows = temperature.shape[0]
    dense = jnp.zeros((rows, vocab), jnp.float32).at[bias_at[:, 0], bias_at[:, 1]].set(bias, mode="drop")
    stop = jnp.zeros((rows, vocab), bool).at[stop_at[:, 0], stop_at[:, 1]].set(True, mode="drop")
    return temperature, top_k, top_p, dense, keys, stop


def admit_rows(vocab: int, layout: tuple[int, int, int], cache: Cache, packed: jax.Array):
    """A group's admission in one device call: (its P-row cache reset for the rows' starts (`reset_rows`), its rows'
    settings (`row_settings`)), both from the one int32 array of admission.host_settings."""
    start = unpack_settings(layout, packed)[-1]
    return reset_rows(cache, start), row_settings(vocab, layout, packed)


# ----- the running batch -----
def insert(slots: Slots, rows: Cache, placement: jax.Array, first: jax.Array, keys: jax.Array,
           temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, bias: jax.Array, stop: jax.Array,
           counts: jax.Array, calls: jax.Array) -> Slots:
    """Put prefilled rows into slots: row j of the P-row cache `rows` goes to slot placement[0, j] (B or more: not
    now), aligned so that its prompt ends at the batch's index, with its first token (fed at the next step), its
    sampling settings, stop ids (V,), remaining length placement[1, j] and the prefill's routing counts (L, E).
    placement (2, P) int32 is the host's one array (one transfer)."""
    slot_of_row, remaining = placement[0], placement[1]
    moved = shift_slots(rows, slots.cache.index - rows.index)
    put = lambda a, v: a.at[slot_of_row].set(jnp.asarray(v, a.dtype), mode="drop")
    layers = tuple({name: put(big[name], small[name]) for name in big}
                   for big, small in zip(slots.cache.layers, moved.layers))
    ones = jnp.ones(slot_of_row.shape, jnp.int32)
    cache = slots.cache.replace(layers=layers, start=put(slots.cache.start, moved.start), fresh=False)
    return slots.replace(cache=cache,
                         last=put(slots.last, first), live=put(slots.live, ones), steps=put(slots.steps, ones),
                         keys=put(slots.keys, keys), temperature=put(slots.temperature, temperature),
                         top_k=put(slots.top_k, top_k), top_p=put(slots.top_p, top_p), bias=put(slots.bias, bias),
                         stop=put(slots.stop, stop), remaining=put(slots.remaining, remaining),
                         counts=put(slots.counts, counts), calls=put(slots.calls, calls))


def release(slots: Slots, rows: jax.Array) -> Slots:
    """Rows where `rows` (B,) is True stop taking part (their tokens become padding)."""
    return slots.replace(live=slots.live & ~rows)


def shift(slots: Slots, delta: jax.Array) -> Slots:
    return slots.replace(cache=shift_slots(slots.cache, delta))


def decode_steps(model: M1ForCausalLM, logprobs: int | None, num_steps: int, params, slots: Slots,
                 with_routing: bool = True, sampling: str = "filter"):
    """num_steps (K) decode steps of every row; see the module docstring. Returns (slots, Drawn).
    logprobs: None draws no log-probabilities; n records each drawn token's and the top n (0: the drawn token's
    only, without the top-k over the vocabulary that costs a third of a step at hf-bench's vocabulary).
    with_routing False (no live request reports routing) skips the per-row routing statistics: their counts stay 0.
    sampling: sample_rows's mode, the least general one that covers the live rows (job.sampling_mode).

    The cache index advances by K, so the host knows it without waiting for the call: it can launch the next call
    before reading this one's tokens."""
    slots = slots.replace(cache=slots.cache.replace(fresh=False))  # as the steps return it (the loop's carry)
    batch = slots.last.shape[0]
    layers_experts = slots.counts.shape[1:]
    with_logprobs = logprobs is not None
    n = min(logprobs or 0, slots.bias.shape[-1])
    drawn = Drawn(tokens=jnp.zeros((num_steps, batch), jnp.int32), emitted=jnp.zeros((num_steps, batch), bool),
                  logp=jnp.zeros((num_steps, batch), jnp.float32) if with_logprobs else None,
                  top_ids=jnp.zeros((num_steps, batch, n), jnp.int32) if with_logprobs else None,
                  top_logp=jnp.zeros((num_steps, batch, n), jnp.float32) if with_logprobs else None,
                  counts=slots.counts, calls=slots.calls,
                  step_counts=jnp.zeros((num_steps, batch) + layers_experts, jnp.float32),
                  step_calls=jnp.zeros((num_steps, batch) + layers_experts, jnp.float32))

    def step(i, carry):
        s, d = carry
        inputs = dict(segment_ids=s.live[:, None].astype(jnp.int32), cache=s.cache)
        if with_routing:
            out, counts, calls = routed_per_row(model, params, s.last[:, None], **inputs)
        else:
            out = model.apply({"params": params}, s.last[:, None], **inputs)
            counts = calls = jnp.zeros((batch,) + layers_experts, jnp.float32)
        logits = out.logits[:, -1]
        token = sample_rows(logits + s.bias, s.temperature, s.top_k, s.top_p, row_keys(s.keys, s.steps), sampling)
        remaining = s.remaining - s.live.astype(jnp.int32)
        stopped = jnp.take_along_axis(s.stop, token[:, None], axis=1)[:, 0] | (remaining <= 0)
        at = lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v, i, axis=0)
        d = d._replace(tokens=at(d.tokens, token), emitted=at(d.emitted, s.live),
                       step_counts=at(d.step_counts, counts), step_calls=at(d.step_calls, calls))
        if with_logprobs:
            logp, top_ids, top_logp = top_logprobs(logits, token, n)
            d = d._replace(logp=at(d.logp, logp), top_ids=at(d.top_ids, top_ids), top_logp=at(d.top_logp, top_logp))
        s = s.replace(cache=out.cache, last=jnp.where(s.live, token, s.last), live=s.live & ~stopped,
                      steps=s.steps + 1, remaining=remaining, counts=s.counts + counts, calls=s.calls + calls)
        return s, d

    index = slots.cache.index
    slots, drawn = jax.lax.fori_loop(0, num_steps, step, (slots, drawn))
    drawn = drawn._replace(counts=slots.counts, calls=slots.calls)  # outputs of their own (slots are donated)
    return slots.replace(cache=slots.cache.replace(index=index + num_steps)), drawn


JITTED = {
    "prefill": jax.jit(prefill_chunk, static_argnums=(0, 1), donate_argnums=3),
    "first": jax.jit(first_tokens, static_argnums=(0, 1)),
    "admit": jax.jit(admit_rows, static_argnums=(0, 1), donate_argnums=2),
    "insert": jax.jit(insert, donate_argnums=0),
    "release": jax.jit(release, donate_argnums=0),
    "shift": jax.jit(shift, donate_argnums=0),
    "decode": jax.jit(decode_steps, static_argnums=(0, 1, 2), static_argnames=("with_routing", "sampling"),
                      donate_argnums=4),
}
