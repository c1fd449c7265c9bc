"""Rollouts: G sampled responses per prompt through the inference engine, their rewards and group advantages, and
the log-probabilities of the sampled tokens seen from both sides of the training-inference split.

    rollout = collect_rollout(model, params, task.examples(step, N), config=RolloutConfig(group_size=G), seed=s)

    rollout.tokens            (B, W + T) int32   B = N * G rows, prompt-major (the G samples of a prompt adjacent):
                                                 the prompt right-aligned in W columns (left padding), then the
                                                 response in T = max_new_tokens columns (pad_id after its stop)
    rollout.segment_ids       (B, W + T) int32   1 on prompt and response tokens, 0 on padding
    rollout.response_mask     (B, T) float32     1 up to and including the stop token (newline or eos), 0 after
    rollout.trainer_logprobs  (B, T) float32     log pi(o_t) recomputed by the trainer's configuration
    rollout.sampler_logprobs  (B, T) float32     log pi(o_t) as the sampler computed it (see below)
    rollout.old_logprobs      (B, T) float32     pi_old of the importance ratio: one of the two above
    rollout.rewards           (B,) float32       the task's verifier on each decoded completion
    rollout.advantages        (B,) float32       group_advantages: (R - mean_group R) / (std_group R + eps)
    rollout.group_ids         (B,) int32         the prompt each row answers

Sampler log-probabilities. The engine samples but does not return log-probabilities, so they are recomputed with
the sampler's own run policy (`sampler_policy`: its compute dtype and lm_head precision) along one of two paths:
"decode" replays the drawn tokens through the engine's cached path (prefill of the prompt, then one-token steps fed
with the drawn tokens: the same computation that chose them), "forward" runs one full forward over prompt + response.
Both are log-probabilities of the tempered distribution softmax(logits / temperature) the tokens were drawn from.

Training-inference mismatch (MiniMax-M1 section 3.3): the paper found the probabilities of the training and the
inference engines drifting apart (Pearson correlation of per-token probabilities 0.987) and closed the gap by
computing the lm_head in float32 (0.997). `probability_mismatch` measures the same two numbers over response tokens:
the correlation of exp(sampler_logprobs) with exp(trainer_logprobs) and their largest absolute gap.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m1jax.config import DTYPES, RunPolicy
from m1jax.inference import engine
from m1jax.inference.generate import generate, make_request
from m1jax.model import M1ForCausalLM
from m1jax.rl.advantages import sequence_advantages
from m1jax.rl.rewards import RewardFn, arith_reward, chain_reward, example_checker, score_batch
from m1jax.tokenizer import ByteTokenizer
from m1jax.tasks import TASKS, Arith, arith_problem, build_task, row_rng, score_arith
from m1jax.tasks.chains import Chains, chain_problem, score_chain
from m1jax.tasks.countdown import CountdownPrompts

SAMPLER_PATHS = ("decode", "forward")
OLD_LOGPROBS = ("trainer", "sampler")
NEWLINE_ID = ord("\n")  # the byte tokenizer's id of "\n", which ends an arith answer


# ------------------------------------------------------------------------------------------------ tasks
@dataclasses.dataclass(frozen=True)
class ArithPrompts:
    """The arith task as prompts with verifiable answers: {"prompt": "12+7=", "answer": "19"}.

    Example i of step s is drawn from row_rng(seed, s, i), so any step's prompts can be rebuilt without replaying
    the ones before it (a resumed run asks for the same prompts). Operands have 1..digits digits, as in pretraining.
    """

    digits: int = 2
    ops: tuple[str, ...] | str = ("+", "-")
    seed: int = 0
    name = "arith"
    reward_fn = staticmethod(arith_reward)

    def __post_init__(self):
        object.__setattr__(self, "ops", Arith(self.digits, self.ops).ops)  # Arith checks digits and ops

    @property
    def max_prompt_len(self) -> int:
        """Bytes of the longest prompt "a<op>b=" (the prompt width W of every rollout)."""
        return 2 * self.digits + 2

    def examples(self, step: int, count: int) -> list[dict]:
        out = []
        for i in range(count):
            prompt, answer = arith_problem(row_rng(self.seed, step, i), self.digits, "".join(self.ops))
            out.append({"prompt": prompt, "answer": answer})
        return out

    @staticmethod
    def is_correct(completion: str, example: Mapping[str, Any]) -> bool:
        """The first line of the completion is exactly the answer (stricter than the reward's last number)."""
        return score_arith(completion, example["answer"])

    def options(self) -> dict:
        return {"digits": self.digits, "ops": "".join(self.ops), "seed": self.seed}


@dataclasses.dataclass(frozen=True)
class ChainPrompts:
    """The chains task (long addition with its carries written out, `m1jax.tasks.chains`) as prompts with verifiable
    answers: {"prompt": "4837+956=", "answer": "5793", "solution": "7+6=13,...#5793"}; the reward grades the
    answer after "#" only. Example i of step s is drawn from row_rng(seed, s, i)."""

    min_digits: int = 4
    max_digits: int = 12
    seed: int = 0
    name = "chains"
    reward_fn = staticmethod(chain_reward)

    def __post_init__(self):
        Chains(self.min_digits, self.max_digits)  # checks the digit range

    @property
    def max_prompt_len(self) -> int:
        return 2 * self.max_digits + 2

    def examples(self, step: int, count: int) -> list[dict]:
        return [chain_problem(row_rng(self.seed, step, i), self.min_digits, self.max_digits) for i in range(count)]

    @staticmethod
    def is_correct(completion: str, example: Mapping[str, Any]) -> bool:
        return score_chain(completion, example["answer"])

    def options(self) -> dict:
        return {"min_digits": self.min_digits, "max_digits": self.max_digits, "seed": self.seed}


RL_TASKS = {"arith": ArithPrompts, "chains": ChainPrompts, "countdown": CountdownPrompts}  # the last: tasks/countdown


def get_rl_task(name: str, **options) -> ArithPrompts | ChainPrompts | CountdownPrompts:
    """An RL task by name: one whose prompts come with an answer a program can verify."""
    if name not in RL_TASKS:
        if name in TASKS:
            raise ValueError(f"task {name!r} has no verifiable answer (its rows are token sequences graded by teacher "
                             f"forcing, not prompts with an answer to check); RL needs one of {sorted(RL_TASKS)}")
        raise ValueError(f"unknown RL task {name!r}; choose one of {sorted(RL_TASKS)}")
    return build_task(RL_TASKS, name, options)


# ------------------------------------------------------------------------------------------------ config
@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How responses are sampled and scored.

    sampler_compute_dtype / sampler_float32_lm_head: the inference engine's numerics (None: the policy's own);
    e.g. "bfloat16" and False give a bf16 engine with a bf16 lm_head, the setting whose mismatch the paper measured.
    sampler_logprobs: "decode" (replay through the engine's cached one-token steps) or "forward" (one full forward).
    old_logprobs: which side supplies pi_old of the importance ratio: "trainer" (recomputed by the training
    configuration under the rollout's parameters, so the first update starts at ratio 1) or "sampler".
    """

    group_size: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    sampler_compute_dtype: str | None = None
    sampler_float32_lm_head: bool | None = None
    sampler_logprobs: str = "decode"
    old_logprobs: str = "trainer"
    chunk_size: int = 4096

    def __post_init__(self):
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"group_size={self.group_size!r}: the group-relative advantage is undefined with fewer "
                             "than 2 samples per prompt; sample G >= 2 responses per prompt")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}: pass a positive integer")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r}: RL samples, so pass a temperature > 0 (greedy "
                             "decoding gives G identical responses and zero advantages)")
        if self.sampler_compute_dtype is not None and self.sampler_compute_dtype not in DTYPES:
            raise ValueError(f"sampler_compute_dtype={self.sampler_compute_dtype!r}; use one of {DTYPES} or None")
        if self.sampler_logprobs not in SAMPLER_PATHS:
            raise ValueError(f"sampler_logprobs={self.sampler_logprobs!r}; choose one of {SAMPLER_PATHS}")
        if self.old_logprobs not in OLD_LOGPROBS:
            raise ValueError(f"old_logprobs={self.old_logprobs!r}; choose one of {OLD_LOGPROBS}")


def sampler_policy(policy: RunPolicy, rollout: RolloutConfig) -> RunPolicy:
    """The inference engine's run policy: the trainer's, with the sampler's compute dtype and lm_head precision (the
    same model either way: only how it is computed differs)."""
    changes = {}
    if rollout.sampler_compute_dtype is not None:
        changes["compute_dtype"] = rollout.sampler_compute_dtype
    if rollout.sampler_float32_lm_head is not None:
        changes["float32_lm_head"] = rollout.sampler_float32_lm_head
    return policy.replace(**changes)


# ------------------------------------------------------------------------------------------------ log-probs
def token_logprobs(logits: jax.Array, targets: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """logits (..., V) and targets (...) -> (log-prob of each target, entropy), both float32, of softmax(logits / T)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    chosen = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return chosen, entropy


def response_terms(model: M1ForCausalLM, params, tokens: jax.Array, segment_ids: jax.Array, response_len: int,
                   temperature: float):
    """One forward over prompt + response: (logprobs (B, T), entropy (B, T), model output).

    tokens (B, W + T): position W - 1 + t predicts response token t (at column W + t).
    """
    out = model.apply({"params": params}, tokens, segment_ids=segment_ids)
    width = tokens.shape[1] - response_len
    logits = out.logits[:, width - 1:-1]
    logprobs, entropy = token_logprobs(logits, tokens[:, width:], temperature)
    return logprobs, entropy, out


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def score_responses(model, params, tokens, segment_ids, response_len: int, temperature: float):
    """Jitted `response_terms` without the model output: (logprobs (B, T), entropy (B, T))."""
    logprobs, entropy, _ = response_terms(model, params, tokens, segment_ids, response_len, temperature)
    return logprobs, entropy


@functools.partial(jax.jit, static_argnums=(0, 5))
def _replay(model, params, cache, drawn, live, temperature: float):
    """Teacher-forced one-token steps through the cache: drawn (B, n) tokens; feeding token t gives the logits of
    token t + 1. Returns (B, n - 1) log-probs of drawn[:, 1:]."""
    def step(cache, column):
        token, is_live = column
        out = model.apply({"params": params}, token[:, None], segment_ids=is_live[:, None], cache=cache)
        return out.cache, out.logits[:, -1]

    cache = cache.replace(fresh=False)  # as the steps return it (the scan's carry)
    _, logits = jax.lax.scan(step, cache, (drawn[:, :-1].T, live[:, :-1].T))
    return token_logprobs(jnp.swapaxes(logits, 0, 1), drawn[:, 1:], temperature)[0]


def replay_logprobs(model: M1ForCausalLM, params, prompts: Sequence[Sequence[int]], drawn: np.ndarray,
                    lengths: np.ndarray, temperature: float, pad_id: int, chunk_size: int = 4096,
                    stop_ids: Sequence[int] = ()) -> np.ndarray:
    """(B, n) log-probs of the drawn tokens (B, n) along the engine's path: start + prefill the prompts (unpadded
    rows, as given to generate), then feed the drawn tokens back one at a time. Rows stop feeding after their
    length (like the engine's finished rows); entries past a row's length are meaningless. stop_ids: those of the
    generation (they only shape the engine's state, so the generation's compiled prefill is reused)."""
    request = make_request(model.config, max(map(len, prompts)), max_new_tokens=drawn.shape[1],
                           temperature=temperature, pad_id=pad_id, chunk_size=chunk_size, stop_ids=stop_ids)
    state = engine.prefill(model, params, engine.start(model.config, prompts, request, policy=model.policy), request)
    drawn = jnp.asarray(drawn, jnp.int32)
    first, _ = token_logprobs(state.last_logits, drawn[:, 0], temperature)
    if drawn.shape[1] == 1:
        return np.asarray(first)[:, None]
    live = (np.arange(drawn.shape[1])[None, :] + 1 < np.asarray(lengths)[:, None]).astype(np.int32)
    rest = _replay(model, params, state.cache, drawn, jnp.asarray(live), temperature)
    return np.concatenate([np.asarray(first)[:, None], np.asarray(rest)], axis=1)


def probability_mismatch(sampler_logprobs, trainer_logprobs, mask) -> dict[str, float]:
    """Pearson correlation and largest absolute gap of the two sides' token probabilities over mask > 0.

    The correlation is 1.0 when the two agree exactly and nan when fewer than two tokens (or a constant side)
    leave it undefined.
    """
    sampler_logprobs, trainer_logprobs, mask = map(np.asarray, (sampler_logprobs, trainer_logprobs, mask))
    if sampler_logprobs.shape != trainer_logprobs.shape or mask.shape != trainer_logprobs.shape:
        raise ValueError(f"sampler_logprobs {sampler_logprobs.shape}, trainer_logprobs {trainer_logprobs.shape} and "
                         f"mask {mask.shape} must have one shape (B, T): the same response tokens on both sides")
    keep = mask > 0
    p = np.exp(sampler_logprobs[keep].astype(np.float64))
    q = np.exp(trainer_logprobs[keep].astype(np.float64))
    if p.size == 0:
        return {"mismatch_corr": float("nan"), "mismatch_max_gap": float("nan")}
    gap = float(np.max(np.abs(p - q)))
    if gap == 0.0:
        corr = 1.0
    elif p.size < 2 or np.std(p) == 0 or np.std(q) == 0:
        corr = float("nan")
    else:
        corr = float(np.corrcoef(p, q)[0, 1])
    return {"mismatch_corr": corr, "mismatch_max_gap": gap}


# ------------------------------------------------------------------------------------------------ rollouts
@dataclasses.dataclass(frozen=True)
class Rollout:
    """One generation batch (shapes in the module docstring), host numpy arrays."""

    tokens: np.ndarray
    segment_ids: np.ndarray
    response_mask: np.ndarray
    trainer_logprobs: np.ndarray
    sampler_logprobs: np.ndarray
    old_logprobs: np.ndarray
    entropy: np.ndarray
    rewards: np.ndarray
    advantages: np.ndarray
    group_ids: np.ndarray
    completions: list[str]
    examples: list[dict]
    reward_stats: dict
    mismatch: dict[str, float]

    @property
    def prompt_width(self) -> int:
        return self.tokens.shape[1] - self.response_mask.shape[1]

    @property
    def response_lengths(self) -> np.ndarray:
        return self.response_mask.sum(axis=1).astype(np.int64)

    def batch(self) -> dict[str, np.ndarray]:
        """The arrays an update step consumes."""
        return {"tokens": self.tokens, "segment_ids": self.segment_ids, "response_mask": self.response_mask,
                "old_logprobs": self.old_logprobs, "advantages": self.advantages}


def decode_completion(tokenizer, ids: Sequence[int]) -> str:
    """Decoded text; ids past the tokenizer's vocabulary (a model vocab may be larger) read as U+FFFD."""
    text, run = [], []
    for i in map(int, ids):
        if i < tokenizer.vocab_size:
            run.append(i)
            continue
        text += [tokenizer.decode(run), "\ufffd"]
        run = []
    return "".join(text) + tokenizer.decode(run)


def _check_examples(examples: Sequence[Mapping[str, Any]], reward_fn: RewardFn) -> None:
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence) or not examples:
        raise ValueError("examples must be a non-empty list of dicts like {'prompt': '12+7=', 'answer': '19'}")
    check = example_checker(reward_fn)
    for i, example in enumerate(examples):
        if not isinstance(example, Mapping) or not isinstance(example.get("prompt"), str) or not example["prompt"]:
            raise ValueError(f"examples[{i}] must be a dict with a non-empty str 'prompt', got {example!r}")
        try:
            check(example)
        except ValueError as err:
            raise ValueError(f"examples[{i}]: {err}") from None


def collect_rollout(model: M1ForCausalLM, params, examples: Sequence[Mapping[str, Any]], *,
                    config: RolloutConfig = RolloutConfig(), seed: int = 0, reward_fn: RewardFn = arith_reward,
                    tokenizer=ByteTokenizer(), prompt_width: int | None = None,
                    stop_ids: Sequence[int] | None = None) -> Rollout:
    """Sample config.group_size responses to each example's prompt and score them (see the module docstring).

    model: the policy in its training run policy; sampling uses `sampler_policy(model.policy, config)`.
    prompt_width: columns W for the prompt (default: the longest prompt); a fixed W keeps the update's shapes,
    and so its compilation, the same from batch to batch. stop_ids: default newline and the tokenizer's eos.
    """
    _check_examples(examples, reward_fn)
    group = config.group_size
    prompts = [tokenizer.encode(example["prompt"]) for example in examples]
    longest = max(map(len, prompts))
    width = longest if prompt_width is None else prompt_width
    if width < longest:
        raise ValueError(f"prompt_width={prompt_width} is shorter than the longest prompt ({longest} tokens); "
                         "raise prompt_width or shorten the prompts")
    if stop_ids is None:
        stop_ids = tuple(i for i in (NEWLINE_ID, tokenizer.eos_id) if i is not None)
    rows = [ids for ids in prompts for _ in range(group)]
    sampler = M1ForCausalLM(model.config, sampler_policy(model.policy, config))
    horizon = config.max_new_tokens
    out = generate(sampler, params, rows, max_new_tokens=horizon, temperature=config.temperature, seed=seed,
                   stop_ids=stop_ids, pad_id=tokenizer.pad_id, chunk_size=config.chunk_size)
    drawn = out.tokens[:, int(out.prompt_lengths.max()):]
    lengths = out.completion_lengths

    size = len(rows)
    tokens = np.full((size, width + horizon), tokenizer.pad_id, np.int32)
    segment_ids = np.zeros((size, width + horizon), np.int32)
    response_mask = (np.arange(horizon)[None, :] < lengths[:, None]).astype(np.float32)
    for b, ids in enumerate(rows):
        tokens[b, width - len(ids):width] = ids
        tokens[b, width:width + lengths[b]] = drawn[b, :lengths[b]]
        segment_ids[b, width - len(ids):width + lengths[b]] = 1

    completions = [decode_completion(tokenizer, drawn[b, :lengths[b]]) for b in range(size)]
    repeated = [example for example in examples for _ in range(group)]
    rewards, reward_stats = score_batch(reward_fn, completions, repeated)
    advantages = np.asarray(sequence_advantages(rewards, group), np.float32)

    trainer_lp, entropy = score_responses(model, params, jnp.asarray(tokens), jnp.asarray(segment_ids), horizon,
                                          float(config.temperature))
    trainer_lp, entropy = np.asarray(trainer_lp), np.asarray(entropy)
    if config.sampler_logprobs == "forward":
        sampler_lp = np.asarray(score_responses(sampler, params, jnp.asarray(tokens), jnp.asarray(segment_ids),
                                                horizon, float(config.temperature))[0])
    else:  # replay all T columns (pad_id past each row's length), so one compilation serves every batch
        sampler_lp = replay_logprobs(sampler, params, rows, tokens[:, width:], lengths, config.temperature,
                                     tokenizer.pad_id, config.chunk_size, stop_ids)
    trainer_lp = np.where(response_mask > 0, trainer_lp, 0.0).astype(np.float32)
    sampler_lp = np.where(response_mask > 0, sampler_lp, 0.0).astype(np.float32)
    return Rollout(
        tokens=tokens, segment_ids=segment_ids, response_mask=response_mask, trainer_logprobs=trainer_lp,
        sampler_logprobs=sampler_lp, old_logprobs=trainer_lp if config.old_logprobs == "trainer" else sampler_lp,
        entropy=np.where(response_mask > 0, entropy, 0.0).astype(np.float32), rewards=rewards,
        advantages=advantages, group_ids=np.repeat(np.arange(len(examples), dtype=np.int32), group),
        completions=completions, examples=repeated, reward_stats=reward_stats,
        mismatch=probability_mismatch(sampler_lp, trainer_lp, response_mask))


def accuracy(rollout: Rollout, is_correct: Callable[[str, Mapping[str, Any]], bool]) -> float:
    """Fraction of the rollout's responses that `is_correct` accepts."""
    return float(np.mean([is_correct(c, e) for c, e in zip(rollout.completions, rollout.examples)]))
