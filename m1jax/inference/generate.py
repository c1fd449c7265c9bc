"""generate(): checked inputs in, tokens + usage + routing out.

    out = generate(model, params, [[1, 2, 3], [4, 5]], max_new_tokens=16, temperature=0.7, top_p=0.9, seed=1)
    out.tokens        (B, P + n) int32: left-padded prompts (pad_id), then the drawn tokens (pad_id after a stop)
    out.completions   per row, the drawn tokens up to and including its stop id
    out.usage         prompt/completion tokens, prefill/decode/compile seconds, tokens per second
    out.routing       (L, E) (token, expert) counts of the request's real tokens, prefill and decode together

P is the longest prompt and n the number of decode steps that ran (max_new_tokens, or fewer once every row has
stopped), as transformers' generate returns them.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np

from m1jax.config import M1Config
import m1jax.inference.engine as engine
from m1jax.inference.engine import InferenceState, Request, Timings
from m1jax.inference.sampling import SamplingParams
from m1jax.model import M1ForCausalLM, abstract_params


@dataclasses.dataclass(frozen=True)
class Usage:
    """Token counts (real tokens, padding excluded) and host wall-clock seconds of this call."""
    prompt_tokens: int
    completion_tokens: int
    prefill_seconds: float
    decode_seconds: float
    compile_seconds: float

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        return self.completion_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, float | int]:
        return {**dataclasses.asdict(self), "prefill_tokens_per_second": self.prefill_tokens_per_second,
                "decode_tokens_per_second": self.decode_tokens_per_second}


@dataclasses.dataclass(frozen=True)
class RoutingSummary:
    """tokens_per_expert (L, E) int64: how many (token, expert) pairs each layer's router chose, over the request's
    real tokens (prompts, and every drawn token that was fed back); expert_calls (L, E) int64: how many of them an
    expert computed (fewer than tokens_per_expert with expert_threshold > 0)."""
    tokens_per_expert: np.ndarray
    expert_calls: np.ndarray
    layer_types: tuple[str, ...]

    @property
    def load(self) -> np.ndarray:
        """(L, E) fraction of each layer's pairs per expert."""
        totals = self.tokens_per_expert.sum(-1, keepdims=True)
        return self.tokens_per_expert / np.maximum(totals, 1)

    @property
    def imbalance(self) -> np.ndarray:
        """(L,) busiest expert's count over the mean count (1.0: perfectly even)."""
        mean = self.tokens_per_expert.mean(-1)
        return self.tokens_per_expert.max(-1) / np.maximum(mean, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {"tokens_per_expert": self.tokens_per_expert.tolist(), "expert_calls": self.expert_calls.tolist(),
                "imbalance": self.imbalance.round(3).tolist(), "layer_types": list(self.layer_types)}


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    tokens: np.ndarray
    prompt_lengths: np.ndarray
    completion_lengths: np.ndarray
    usage: Usage
    routing: RoutingSummary

    @property
    def completions(self) -> list[list[int]]:
        width = int(self.prompt_lengths.max())  # the longest prompt has no padding
        return [row[width:width + n].tolist() for row, n in zip(self.tokens, self.completion_lengths)]


@functools.lru_cache(maxsize=16)
def _param_shapes(config: M1Config) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(path): leaf.shape
            for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params(config))}


def check_params(config: M1Config, params: Any) -> None:
    """Raise ValueError naming the first parameter whose presence or shape does not match the config."""
    want = _param_shapes(config)
    got = {jax.tree_util.keystr(path): np.shape(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or unexpected:
        raise ValueError(f"params do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}; "
                         "load them with the config they were made for")
    for name, shape in want.items():
        if tuple(got[name]) != tuple(shape):
            raise ValueError(f"params do not match the config: {name} has shape {tuple(got[name])}, the config "
                             f"expects {tuple(shape)}; load them with the config they were made for")


def check_prompts(prompt_ids: Any, vocab_size: int) -> list[list[int]]:
    """A 1-D sequence (one prompt), a 2-D array or a list of rows -> list of non-empty rows of ids < vocab_size."""
    if isinstance(prompt_ids, (np.ndarray, jax.Array)):
        array = np.asarray(prompt_ids)
        if array.ndim not in (1, 2) or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"prompt_ids must be integer ids of shape (T,) or (B, T), got {array.dtype} "
                             f"{array.shape}")
        rows = [array.tolist()] if array.ndim == 1 else array.tolist()
    elif isinstance(prompt_ids, Sequence) and prompt_ids and all(isinstance(i, (int, np.integer))
                                                                 for i in prompt_ids):
        rows = [list(prompt_ids)]
    elif isinstance(prompt_ids, Sequence) and not isinstance(prompt_ids, str):
        rows = [list(row) if isinstance(row, (Sequence, np.ndarray)) and not isinstance(row, str) else None
                for row in prompt_ids]
        if any(row is None for row in rows):
            raise ValueError("prompt_ids must be a list of token id lists (one per prompt); tokenize text first")
    else:
        raise ValueError(f"prompt_ids must be token ids (a list, a list of lists or an int array), got "
                         f"{type(prompt_ids).__name__}; tokenize text first")
    if not rows:
        raise ValueError("prompt_ids holds no prompt; pass at least one")
    for b, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {b} is empty; every prompt needs at least one token (e.g. a bos id)")
        if not all(_is_int(i) for i in row):
            raise ValueError(f"prompt {b} holds non-integer entries; pass token ids")
        bad = [int(i) for i in row if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"prompt {b} has ids {bad[:5]} outside [0, vocab_size={vocab_size}); the tokenizer does "
                             "not match the model")
    return [[int(i) for i in row] for row in rows]


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _check_id(name: str, value: int | None, vocab_size: int) -> None:
    if value is not None and (not _is_int(value) or not 0 <= value < vocab_size):
        raise ValueError(f"{name}={value!r} must be a token id in [0, vocab_size={vocab_size})")


def make_request(config: M1Config, longest_prompt: int, *, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0, eos_id: int | None = None,
                 stop_ids: Sequence[int] = (), pad_id: int = 0, chunk_size: int = 4096) -> Request:
    """Check the settings against the config and bundle them (ValueError naming the argument and its range)."""
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        _check_id(name, value, config.vocab_size)
    if isinstance(stop_ids, (str, bytes)) or not isinstance(stop_ids, (Sequence, np.ndarray)):
        raise ValueError(f"stop_ids must be a list of token ids, got {stop_ids!r}")
    for i in stop_ids:
        _check_id("stop_ids entry", i, config.vocab_size)
    for name, value in (("max_new_tokens", max_new_tokens), ("chunk_size", chunk_size), ("seed", seed)):
        if not _is_int(value) or not (-2 ** 63 <= value < 2 ** 63 if name == "seed" else value >= 1):
            raise ValueError(f"{name} must be {'an integer in [-2^63, 2^63)' if name == 'seed' else 'an integer >= 1'},"
                             f" got {value!r}")
    if not _is_real(temperature) or not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
    max_new_tokens, chunk_size, seed = int(max_new_tokens), int(chunk_size), int(seed)
    temperature = float(temperature)
    top_k = None if top_k is None else int(top_k)
    top_p = None if top_p is None else float(top_p)
    request = Request(max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature, top_k, top_p),
                      stop_ids=tuple(stop_ids) + (() if eos_id is None else (eos_id,)), pad_id=pad_id,
                      chunk_size=chunk_size, seed=seed)
    if longest_prompt + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"the longest prompt ({longest_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's max_position_embeddings={config.max_position_embeddings}; shorten the prompt "
                         "or ask for fewer tokens (nothing is truncated silently)")
    return request


def finish(config: M1Config, state: InferenceState, request: Request, timings: Timings) -> GenerateOutput:
    """Read a decoded state back to the host."""
    start = np.asarray(state.cache.start)
    prompt = np.asarray(state.prompt)
    drawn = np.asarray(state.tokens)[:, :int(state.num_generated)]
    stopped = np.isin(drawn, np.asarray(request.stop_ids, np.int64))
    first_stop = np.where(stopped.any(1), stopped.argmax(1) + 1, drawn.shape[1])
    prompt_lengths = prompt.shape[1] - start
    usage = Usage(prompt_tokens=int(prompt_lengths.sum()), completion_tokens=int(first_stop.sum()),
                  prefill_seconds=timings.prefill_seconds, decode_seconds=timings.decode_seconds,
                  compile_seconds=timings.compile_seconds)
    as_counts = lambda x: np.rint(np.asarray(x)).astype(np.int64)
    routing = RoutingSummary(as_counts(state.expert_counts), as_counts(state.expert_calls), config.layer_types)
    return GenerateOutput(tokens=np.concatenate([prompt, drawn], axis=1).astype(np.int32),
                          prompt_lengths=prompt_lengths.astype(np.int64),
                          completion_lengths=first_stop.astype(np.int64), usage=usage, routing=routing)


def model_with_threshold(model: M1ForCausalLM, expert_threshold: float | None) -> M1ForCausalLM:
    """The model with its policy's expert_threshold replaced (None keeps the policy's); the config is unchanged."""
    if not isinstance(model, M1ForCausalLM):
        raise ValueError(f"model must be an m1jax M1ForCausalLM, got {type(model).__name__}")
    if expert_threshold is None or expert_threshold == model.policy.expert_threshold:
        return model
    return model.clone(policy=model.policy.replace(expert_threshold=expert_threshold))


def continue_generation(model: M1ForCausalLM, params: Any, state: InferenceState, request: Request, *,
                        stream: Callable[[int, np.ndarray], Any] | None = None, stream_interval: int = 1,
                        timings: Timings | None = None) -> GenerateOutput:
    """Finish a started (possibly restored) generation: the rest of the prefill, then decoding."""
    timings = timings if timings is not None else Timings()
    state = engine.prefill(model, params, state, request, timings=timings)
    state = engine.decode(model, params, state, request, stream=stream, stream_interval=stream_interval,
                          timings=timings)
    return finish(model.config, state, request, timings)


def generate(model: M1ForCausalLM, params: Any, prompt_ids: Any, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, eos_id: int | None = None,
             stop_ids: Sequence[int] = (), expert_threshold: float = 0.0, pad_id: int = 0, chunk_size: int = 4096,
             stream: Callable[[int, np.ndarray], Any] | None = None, stream_interval: int = 1) -> GenerateOutput:
    """Generate up to max_new_tokens for each prompt (see the module docstring for the output).

    prompt_ids: one prompt (list of ids) or several (list of lists, any lengths; left-padded with pad_id).
    temperature 0 is greedy; otherwise a draw after top_k / top_p filtering, from seed. A row stops after eos_id or
    any of stop_ids. expert_threshold replaces the model policy's (see RunPolicy). chunk_size: prompt slots per
    prefill call. stream(step, tokens (B,)) sees every step's tokens as they are drawn, stream_interval at a time.
    """
    model = model_with_threshold(model, expert_threshold)
    config = model.config
    check_params(config, params)
    rows = check_prompts(prompt_ids, config.vocab_size)
    request = make_request(config, max(map(len, rows)), max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, seed=seed, eos_id=eos_id, stop_ids=stop_ids, pad_id=pad_id,
                           chunk_size=chunk_size)
    state = engine.start(config, rows, request, policy=model.policy)
    return continue_generation(model, params, state, request, stream=stream, stream_interval=stream_interval)
