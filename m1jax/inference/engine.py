"""The generation engine: left-padded prompts, chunked prefill, a jitted decode loop, per-row stopping.

    state = start(config, prompt_ids, request)           pad the prompts, allocate the cache
    state = prefill(model, params, state, request)       chunk by chunk (host loop); `max_chunks` stops part-way
    state = decode(model, params, state, request)        sample, feed back, stop rows at a stop id

Prefill runs the prompt through the model `request.chunk_size` slots at a time: lightning layers carry their
(B, H, D, D) state from chunk to chunk (memory does not grow with the prompt), softmax layers write their keys and
values into the cache and attend over it. Only the last position's logits are computed.

Decoding: the first token is drawn from the prefill's last logits; then one `lax.while_loop` inside one jit feeds
each drawn token back (a one-token step: `lightning_decode` and attention over the cache) and draws the next, until
max_new_tokens or until every row has produced a stop id. A stopped row keeps emitting `pad_id` and is masked out
of routing statistics. Streaming is host-driven: with a callback the loop runs `stream_interval` tokens per call
and hands each step's tokens to the callback between calls (no host callbacks inside the compiled loop).

Draws use jax.random.fold_in(key(seed), step): the same seed gives the same tokens, also after a resume.
Every jitted step is compiled ahead of time (timed apart from the run) and donates the state, so the cache is
updated in place.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from m1jax.config import M1Config, RunPolicy
from m1jax.inference.cache import Cache, abstract_cache, init_cache
from m1jax.inference.sampling import SamplingParams, sample_tokens
from m1jax.model import M1ForCausalLM

SLOT_MULTIPLE = 64  # the cache's slot count is rounded up to this, so similar requests share compiled steps


@dataclasses.dataclass(frozen=True)
class Request:
    """The settings of a generation. Only `sampling` specialises the compiled steps; the rest is data."""
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    chunk_size: int = 4096
    seed: int = 0

    def __post_init__(self):
        for name in ("max_new_tokens", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))


@flax.struct.dataclass
class InferenceState:
    """Everything needed to continue a generation (saved and restored by m1jax.inference.state_io).

    cache: the model's cache (cache.index = prompt slots prefilled so far, then + decoded tokens);
    prompt (B, P) int32 left-padded prompts; last_logits (B, V) float32 after the last prefilled token;
    tokens (B, N) int32 drawn tokens (pad_id where not drawn or after a stop); num_generated () int32;
    done (B,) bool; stop_ids (S,) int32; pad_id () int32; rng (2,) uint32 key data of the base key;
    expert_counts (L, E) float32: the routers' (token, expert) choices for the real tokens run so far;
    expert_calls (L, E) float32: those an expert computed (fewer with expert_threshold or a capacity).
    """
    cache: Cache
    prompt: jax.Array
    last_logits: jax.Array
    tokens: jax.Array
    num_generated: jax.Array
    done: jax.Array
    stop_ids: jax.Array
    pad_id: jax.Array
    rng: jax.Array
    expert_counts: jax.Array
    expert_calls: jax.Array

    @property
    def prompt_len(self) -> int:
        return self.prompt.shape[1]


def pad_prompts(prompt_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad rows of token ids to one length. Returns ((B, P) int32 ids, (B,) int32 count of leading pads)."""
    lengths = [len(row) for row in prompt_ids]
    width = max(lengths)
    padded = np.full((len(prompt_ids), width), pad_id, np.int32)
    for b, row in enumerate(prompt_ids):
        padded[b, width - len(row):] = row
    return padded, np.asarray([width - n for n in lengths], np.int32)


def abstract_state(config: M1Config, batch: int, prompt_len: int, max_len: int, max_new_tokens: int,
                   num_stop_ids: int, *, policy: RunPolicy = RunPolicy()) -> InferenceState:
    """Shapes and dtypes of an InferenceState (the orbax restore target) for a model run under `policy`."""
    sds = jax.ShapeDtypeStruct
    return InferenceState(
        cache=abstract_cache(config, batch, max_len, policy=policy), prompt=sds((batch, prompt_len), jnp.int32),
        last_logits=sds((batch, config.vocab_size), jnp.float32), tokens=sds((batch, max_new_tokens), jnp.int32),
        num_generated=sds((), jnp.int32), done=sds((batch,), jnp.bool_), stop_ids=sds((num_stop_ids,), jnp.int32),
        pad_id=sds((), jnp.int32), rng=sds(jax.random.key_data(jax.random.key(0)).shape, jnp.uint32),
        expert_counts=sds((config.num_layers, config.num_experts), jnp.float32),
        expert_calls=sds((config.num_layers, config.num_experts), jnp.float32))


def start(config: M1Config, prompt_ids: Sequence[Sequence[int]], request: Request, *,
          policy: RunPolicy = RunPolicy()) -> InferenceState:
    """Pad the prompts (already checked by the caller) and allocate an empty cache for prompt + new tokens, in the
    compute dtype of `policy` (the model's: model.policy)."""
    padded, start_slots = pad_prompts(prompt_ids, request.pad_id)
    batch, prompt_len = padded.shape
    slots = prompt_len + request.max_new_tokens
    max_len = -(-slots // SLOT_MULTIPLE) * SLOT_MULTIPLE
    return InferenceState(
        cache=init_cache(config, batch, max_len, start_slots, policy=policy), prompt=jnp.asarray(padded),
        last_logits=jnp.zeros((batch, config.vocab_size), jnp.float32),
        tokens=jnp.full((batch, request.max_new_tokens), request.pad_id, jnp.int32),
        num_generated=jnp.zeros((), jnp.int32), done=jnp.zeros((batch,), bool),
        stop_ids=jnp.asarray(request.stop_ids, jnp.int32).reshape(-1), pad_id=jnp.int32(request.pad_id),
        rng=jax.random.key_data(jax.random.key(request.seed)).astype(jnp.uint32),
        expert_counts=jnp.zeros((config.num_layers, config.num_experts), jnp.float32),
        expert_calls=jnp.zeros((config.num_layers, config.num_experts), jnp.float32))


# ----- the jitted steps -----
def _add_routing(state: InferenceState, routing: dict) -> InferenceState:
    counts = routing["tokens_per_expert"]
    return state.replace(expert_counts=state.expert_counts + counts,
                         expert_calls=state.expert_calls + routing.get("expert_calls", counts))


def _prefill_chunk(model: M1ForCausalLM, params, state: InferenceState, chunk_ids: jax.Array) -> InferenceState:
    out = model.apply({"params": params}, chunk_ids, cache=state.cache, last_logits_only=True)
    return _add_routing(state.replace(cache=out.cache, last_logits=out.logits[:, -1]), out.routing)


def _record(sampling: SamplingParams, state: InferenceState, logits: jax.Array) -> InferenceState:
    """Draw the next token of every row from logits (B, V); stopped rows get pad_id."""
    step = state.num_generated
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
    token = jnp.where(state.done, state.pad_id, sample_tokens(logits, sampling, key))
    done = state.done | jnp.any(token[:, None] == state.stop_ids[None, :], axis=-1)
    return state.replace(tokens=jax.lax.dynamic_update_index_in_dim(state.tokens, token, step, axis=1),
                         num_generated=step + 1, done=done)


def _first_token(sampling: SamplingParams, state: InferenceState) -> InferenceState:
    return _record(sampling, state, state.last_logits)


def _decode_until(model: M1ForCausalLM, sampling: SamplingParams, params, state: InferenceState,
                  limit: jax.Array) -> InferenceState:
    """Feed back and draw tokens until num_generated reaches limit or every row has stopped."""
    def unfinished(s):
        return (s.num_generated < limit) & ~jnp.all(s.done)

    def step(s):
        previous = jax.lax.dynamic_index_in_dim(s.tokens, s.num_generated - 1, axis=1)  # (B, 1)
        live = (~s.done)[:, None].astype(jnp.int32)  # finished rows stay out of the routing counts
        out = model.apply({"params": params}, previous, segment_ids=live, cache=s.cache)
        return _record(sampling, _add_routing(s.replace(cache=out.cache), out.routing), out.logits[:, -1])

    state = state.replace(cache=state.cache.replace(fresh=False))  # as the steps return it (the loop's carry)
    return jax.lax.while_loop(unfinished, step, state)


_JITTED = {
    "prefill": jax.jit(_prefill_chunk, static_argnums=0, donate_argnums=2),
    "first": jax.jit(_first_token, static_argnums=0, donate_argnums=1),
    "decode": jax.jit(_decode_until, static_argnums=(0, 1), donate_argnums=3),
}
_COMPILED: dict = {}


@dataclasses.dataclass
class Timings:
    """Host wall-clock seconds around block_until_ready; compilation is timed apart."""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    compile_seconds: float = 0.0


def _run(name: str, statics: tuple, args: tuple, timings: Timings):
    """Call a jitted step through an ahead-of-time compiled executable (compiled once per shapes and statics)."""
    leaves = tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in jax.tree.leaves(args))
    key = (name, statics, jax.tree.structure(args), leaves)
    if key not in _COMPILED:
        begin = time.perf_counter()
        _COMPILED[key] = _JITTED[name].lower(*statics, *args).compile()
        timings.compile_seconds += time.perf_counter() - begin
    return _COMPILED[key](*args)


def prefill_remaining(state: InferenceState) -> int:
    """Prompt slots still to prefill (reads the cache index from the device)."""
    return state.prompt_len - int(state.cache.index)


def prefill(model: M1ForCausalLM, params, state: InferenceState, request: Request, *,
            max_chunks: int | None = None, timings: Timings | None = None) -> InferenceState:
    """Run the remaining prompt through the model, request.chunk_size slots per call (at most max_chunks calls).

    The state is donated to each call: keep only the returned one.
    """
    timings = timings if timings is not None else Timings()
    compile_before = timings.compile_seconds
    begin = time.perf_counter()
    position = state.prompt_len - prefill_remaining(state)
    chunks = 0
    while position < state.prompt_len and (max_chunks is None or chunks < max_chunks):
        end = min(position + request.chunk_size, state.prompt_len)
        chunk_ids = jnp.array(state.prompt[:, position:end], copy=True)  # a fresh buffer: the state is donated
        state = _run("prefill", (model,), (params, state, chunk_ids), timings)
        position, chunks = end, chunks + 1
    jax.block_until_ready(state.last_logits)
    timings.prefill_seconds += time.perf_counter() - begin - (timings.compile_seconds - compile_before)
    return state


def decode(model: M1ForCausalLM, params, state: InferenceState, request: Request, *,
           stream: Callable[[int, np.ndarray], Any] | None = None, stream_interval: int = 1,
           timings: Timings | None = None) -> InferenceState:
    """Draw the remaining tokens. stream(step, tokens (B,) int32) is called once per drawn step, in order.

    Without a callback the whole loop is one compiled call; with one, calls of stream_interval tokens.
    """
    if prefill_remaining(state):
        raise ValueError("decode needs a finished prefill: call prefill(...) until the whole prompt is in the cache")
    if not isinstance(stream_interval, int) or isinstance(stream_interval, bool) or stream_interval < 1:
        raise ValueError(f"stream_interval must be a positive integer, got {stream_interval!r}")
    timings = timings if timings is not None else Timings()
    total = request.max_new_tokens
    compile_before = timings.compile_seconds
    begin = time.perf_counter()
    emitted = int(state.num_generated)  # tokens drawn before this call were streamed by whoever drew them
    if emitted == 0:
        state = _run("first", (request.sampling,), (state,), timings)
    while True:
        now = int(state.num_generated)
        if stream is not None and now > emitted:
            drawn = np.asarray(state.tokens[:, emitted:now])
            for offset in range(now - emitted):
                stream(emitted + offset, drawn[:, offset])
            emitted = now
        if now >= total or bool(jnp.all(state.done)):
            break
        limit = total if stream is None else min(now + stream_interval, total)
        state = _run("decode", (model, request.sampling), (params, state, jnp.int32(limit)), timings)
    jax.block_until_ready(state.tokens)
    timings.decode_seconds += time.perf_counter() - begin - (timings.compile_seconds - compile_before)
    return state
