"""The RL trainer: generation batches of G responses per prompt, each feeding several off-policy updates.

    for step in range(steps):                                   one generation batch per step
        examples = task.examples(step, prompts_per_step)        a pure function of (seed, step)
        rollout = collect_rollout(model, state.params, ...)     B = N * G responses, rewards, advantages, pi_old
        for minibatch in split(shuffle(rollout), updates_per_batch):
            state = update(state, minibatch)                    one optimizer step; pi_old stays the rollout's

M1 fed each generation batch into 16 such updates; the later ones are off-policy (pi_theta has moved away from the
pi_old that sampled the tokens), which is what the importance ratio r = pi_theta / pi_old and its clipping handle.

The update is one jitted step `(TrainState, minibatch) -> (TrainState, metrics)`: a forward over prompt + response
with the current parameters, the log-probabilities of the response tokens, the chosen loss (CISPO, GRPO, DAPO or
PPO-clip from `m1jax.rl.losses`); the MoE auxiliary terms, the gradients' shardings, AdamW, the run directory and
resuming are the run harness's (`m1jax.train.harness`), the same as pretraining's.

DAPO's dynamic sampling drops groups whose G rewards are all equal (they have zero advantage, so they only dilute
the token-level mean). DAPO over-samples to refill the batch; here the dropped groups are not replaced, so every
algorithm gets the same generation budget. GRPO's KL term (the GRPO paper's beta 0.04 by default) takes the
initial parameters as the reference policy.

Each step appends one line to metrics.jsonl (reward, accuracy, response length, clip fractions, entropy, mismatch,
approx_kl, loss, grad_norm and grad_norm_max over the batch's updates, lr, ...); checkpoints hold the TrainState and
the data position, and rerunning the same command resumes from the latest one ("resuming from step N of OUT") with
the same metrics as an uninterrupted run. With `token_stats`, each step also appends to tokens.jsonl which tokens
left the clip band at their update (`clip_token_stats`: counts by role and byte, old-policy probabilities, the
largest ratios with their text), the mechanism CISPO is about: PPO-style clipping drops exactly those tokens'
gradients.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import m1jax.rl.losses as losses
from m1jax import sharding
from m1jax.checkpoint.load import load_any
from m1jax.checkpoint.state import TrainCheckpoints
from m1jax.config import M1Config
from m1jax.inference.generate import generate
from m1jax.model import M1ForCausalLM
from m1jax.rl.rollout import (NEWLINE_ID, Rollout, RolloutConfig, accuracy, collect_rollout, decode_completion,
                              get_rl_task, response_terms, score_responses)
from m1jax.tasks.chains import ANSWER_MARK
from m1jax.tokenizer import ByteTokenizer
from m1jax.train import harness
from m1jax.train.harness import TrainState
from m1jax.train.optimizer import OptimizerConfig, make_optimizer
from m1jax.train.run_log import truncate_metrics

ALGOS = ("cispo", "grpo", "dapo", "ppo")
RUN_CONFIG_FILE = "rl_config.json"
TOKENS_FILE = "tokens.jsonl"
UPDATE_KEYS = ("tokens", "segment_ids", "response_mask", "old_logprobs", "advantages", "ref_logprobs")


# ------------------------------------------------------------------------------------------------ losses
@dataclasses.dataclass(frozen=True)
class LossConfig:
    """algo: "cispo" | "grpo" | "dapo" | "ppo". eps_high: CISPO's and DAPO's upper clip bound. eps: the symmetric
    band of PPO and GRPO, and DAPO's lower bound. kl_beta: GRPO's KL coefficient towards the initial policy
    (None: the GRPO paper's 0.04 for GRPO, no KL term for the others; 0: GRPO without a reference model)."""

    algo: str = "cispo"
    eps_high: float = losses.CISPO_EPS_HIGH
    eps: float = losses.PPO_EPS
    kl_beta: float | None = None

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"algo={self.algo!r}; choose one of {ALGOS}")
        for name in ("eps_high", "eps", "kl_beta"):
            value = getattr(self, name)
            if name == "kl_beta" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name}={value!r}: pass a float >= 0")
        if self.kl_beta and self.algo != "grpo":
            raise ValueError(f"kl_beta={self.kl_beta} is GRPO's KL coefficient; algo {self.algo!r} has no KL term "
                             "(pass kl_beta=None or 0)")

    @property
    def beta(self) -> float:
        """The KL coefficient in effect."""
        if self.kl_beta is None:
            return losses.GRPO_BETA if self.algo == "grpo" else 0.0
        return float(self.kl_beta)

    @property
    def clip_band(self) -> tuple[float, float] | None:
        """(eps_low, eps_high) of the PPO-style clipping that drops tokens; None for CISPO, which drops none."""
        if self.algo == "cispo":
            return None
        return self.eps, self.eps_high if self.algo == "dapo" else self.eps


def policy_loss(cfg: LossConfig, logprobs, old_logprobs, advantages, mask, ref_logprobs=None):
    """(loss, metrics) of the configured algorithm on (B, T) log-probs (see m1jax.rl.losses)."""
    if cfg.algo == "cispo":
        return losses.cispo_loss(logprobs, old_logprobs, advantages, mask, eps_high=cfg.eps_high)
    if cfg.algo == "dapo":
        return losses.dapo_loss(logprobs, old_logprobs, advantages, mask, eps_low=cfg.eps, eps_high=cfg.eps_high)
    if cfg.algo == "ppo":
        return losses.ppo_clip_loss(logprobs, old_logprobs, advantages, mask, eps=cfg.eps)
    return losses.grpo_loss(logprobs, old_logprobs, advantages, mask, eps=cfg.eps,
                            ref_logprobs=ref_logprobs if cfg.beta else None, beta=cfg.beta)


# ------------------------------------------------------------------------------------------------ the update
def update_objective(model: M1ForCausalLM, loss_cfg: LossConfig, temperature: float, params, batch: dict,
                     token_stats: bool = False):
    """(objective, metrics) of one minibatch: the policy loss + the MoE auxiliary losses, entropy as a metric.
    token_stats: metrics also hold "token_ratio" (B, T), r = pi_theta / pi_old per token (1 on padding)."""
    response_len = batch["response_mask"].shape[1]
    logprobs, entropy, out = response_terms(model, params, batch["tokens"], batch["segment_ids"], response_len,
                                            temperature)
    mask = batch["response_mask"]
    loss, metrics = policy_loss(loss_cfg, logprobs, batch["old_logprobs"], batch["advantages"], mask,
                                batch.get("ref_logprobs"))
    metrics = dict(metrics, entropy=jnp.sum(entropy * mask) / jnp.maximum(jnp.sum(mask), 1.0),
                   aux_loss=out.aux_loss)
    if token_stats:
        log_ratio = jnp.where(mask > 0, logprobs - batch["old_logprobs"], 0.0)
        metrics["token_ratio"] = jax.lax.stop_gradient(jnp.exp(log_ratio))
    return loss + harness.moe_aux_loss(model.config, out), metrics


def make_update_step(model: M1ForCausalLM, optimizer: optax.GradientTransformation, loss_cfg: LossConfig, *,
                     temperature: float = 1.0, state_shardings: Any = None, batch_shardings: Any = None,
                     token_stats: bool = False) -> Callable:
    """Jitted `update(state, minibatch) -> (state, metrics)`; the state is donated.

    minibatch: tokens, segment_ids (B, W + T) int32; response_mask, old_logprobs (B, T); advantages (B,); and
    ref_logprobs (B, T) for GRPO with a KL term. batch_shardings: a dict of shardings with the same keys.
    """
    grad_fn = jax.value_and_grad(functools.partial(update_objective, model, loss_cfg, float(temperature),
                                                   token_stats=token_stats), has_aux=True)

    def update(state: TrainState, batch: dict):
        (objective, metrics), grads = grad_fn(state.params, batch)
        grads = harness.like_params(grads, state_shardings)
        metrics = dict(metrics, objective=objective, grad_norm=optax.tree.norm(grads))
        return harness.apply_gradients(state, grads, optimizer), metrics

    return harness.jit_update(update, state_shardings, batch_shardings)


def mesh_shardings(axes: dict[str, int], config: M1Config, abstract_state: TrainState,
                   optimizer: optax.GradientTransformation, minibatch_size: int, with_reference: bool = False):
    """(mesh, TrainState shardings, minibatch shardings by key) for a mesh like {"data": 2, "expert": 4}: the
    parameters and moments by the project's rules (as in pretraining), the minibatch's rows over the batch axes.
    with_reference: the minibatch carries ref_logprobs (GRPO's KL term)."""
    mesh, shardings = harness.mesh_for(axes, config, abstract_state, optimizer, minibatch_size)
    keys = UPDATE_KEYS if with_reference else tuple(k for k in UPDATE_KEYS if k != "ref_logprobs")
    batch = {k: sharding.batch_sharding(mesh, minibatch_size, ndim=1 if k == "advantages" else 2) for k in keys}
    return mesh, shardings, batch


# ------------------------------------------------------------------------------------------------ the mechanism
REFERENCE_BAND = (losses.DAPO_EPS_LOW, losses.DAPO_EPS_HIGH)  # "outside the band": r < 0.8 or r > 1.28, every algo
PROB_BINS = (0.0, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0 + 1e-6)  # old-policy probability bins of the histograms
TOKEN_ROLES = ("operand", "carry_decision", "sum", "separator", "answer")
_COUNTS = ("tokens", "high", "low", "dropped")


def token_roles(ids: np.ndarray) -> np.ndarray:
    """(B, T) response byte ids of the chains task -> (B, T) index into TOKEN_ROLES.

    carry_decision: the byte right after a step's "x+y" ("+" opens the carry "+1", "=" says there is none), the
    chain's fork; sum: the digits after "="; separator: "," "#" newline; answer: everything after "#"; operand: the
    rest (operand digits, "+", the carry's "1"). For other tasks the roles are meaningless but harmless.
    """
    ids = np.asarray(ids)

    def back(k):  # ids shifted right by k (-1 before the start)
        return np.pad(ids, ((0, 0), (k, 0)), constant_values=-1)[:, :ids.shape[1]]

    digit = lambda a: (a >= 48) & (a <= 57)  # noqa: E731
    step_start = (back(4) == ord(",")) | (back(4) == -1)
    decision = digit(back(1)) & (back(2) == ord("+")) & digit(back(3)) & step_start & (back(3) != -1)
    sums = digit(ids) & ((back(1) == ord("=")) | (digit(back(1)) & (back(2) == ord("="))))
    hash_ = ids == ord(ANSWER_MARK)
    answer = (np.cumsum(hash_, axis=1) - hash_) > 0
    separator = (ids == ord(",")) | hash_ | (ids == ord("\n"))
    roles = np.zeros(ids.shape, np.int64)
    roles[sums] = 2
    roles[decision] = 1
    roles[separator] = 3
    roles[answer] = 4
    return roles


def _token_text(token: int) -> str:
    return chr(token) if 32 <= token < 127 else "\\n" if token == 10 else f"<{token}>"


def clip_token_stats(rollout: Rollout, ratios: np.ndarray, mask: np.ndarray, loss_cfg: LossConfig,
                     examples: int = 12, roles_fn: Callable = token_roles, role_names: tuple = TOKEN_ROLES) -> dict:
    """Which response tokens left the clip band in their update, for one generation batch (host numpy).

    ratios (B, T): r = pi_theta / pi_old of each token at the update that used it; mask (B, T): the tokens that
    entered the loss. "high" r > 1 + 0.28, "low" r < 1 - 0.2 (REFERENCE_BAND, the same for every algorithm);
    "dropped": tokens whose gradient the algorithm's own clipping zeroes (none for CISPO). Counts by role
    (`roles_fn`: (B, T) response ids -> index into `role_names`; default the chains task's `token_roles`) and by
    byte, histograms of the old-policy probability pi_old(o_t) over PROB_BINS, and the `examples` tokens with the
    largest ratios (their preceding text, pi_old, r, advantage).
    """
    valid = np.asarray(mask) > 0
    ratios = np.asarray(ratios, np.float64)
    old_prob = np.exp(np.asarray(rollout.old_logprobs, np.float64))
    advantages = np.broadcast_to(np.asarray(rollout.advantages, np.float64)[:, None], ratios.shape)
    low_eps, high_eps = REFERENCE_BAND
    high = valid & (ratios > 1.0 + high_eps)
    low = valid & (ratios < 1.0 - low_eps)
    if loss_cfg.clip_band is None:
        dropped = np.zeros_like(valid)
    else:  # ppo_dropped_tokens reads the mask, the ratios and the advantages: host float64 arrays work as they are
        terms = losses.TokenTerms(mask=valid, logprobs=None, log_ratio=None, ratio=ratios, advantages=advantages,
                                  num_tokens=None)
        dropped = np.asarray(losses.ppo_dropped_tokens(terms, *loss_cfg.clip_band))
    width = rollout.prompt_width
    ids = np.asarray(rollout.tokens)[:, width:]
    roles = roles_fn(ids)
    sets = dict(zip(_COUNTS, (valid, high, low, dropped)))
    by_role = {role: [int((m & (roles == i)).sum()) for m in sets.values()] for i, role in enumerate(role_names)}
    present = np.unique(ids[valid])
    by_byte = {_token_text(int(t)): [int((m & (ids == t)).sum()) for m in sets.values()] for t in present}
    hist = {name: np.histogram(old_prob[m], bins=PROB_BINS)[0].tolist() for name, m in sets.items()}
    order = np.argsort(-np.where(high, ratios, -np.inf), axis=None)[:examples]
    top = []
    for flat in order:
        b, t = np.unravel_index(flat, ratios.shape)
        if not high[b, t]:
            break
        top.append({"context": "".join(_token_text(int(x)) for x in ids[b, max(0, t - 16):t]),
                    "token": _token_text(int(ids[b, t])), "role": role_names[roles[b, t]],
                    "old_prob": float(old_prob[b, t]), "ratio": float(ratios[b, t]),
                    "advantage": float(advantages[b, t])})
    return {"counts": {name: int(m.sum()) for name, m in sets.items()},
            "high_positive": int((high & (advantages > 0)).sum()), "by_role": by_role, "by_byte": by_byte,
            "prob_hist": hist, "top_high": top}


def _tokens_log(path: str, start: int):
    """tokens.jsonl opened for appending after the lines of steps <= start (a resumed run rewrites the rest)."""
    truncate_metrics(path, start)
    return open(path, "a")


# ------------------------------------------------------------------------------------------------ the run
@dataclasses.dataclass
class RLConfig:
    """A run. steps counts generation batches; each feeds updates_per_batch optimizer steps of
    prompts_per_step * group_size / updates_per_batch responses."""

    out: str
    init: str | None = None  # a training output or Hugging Face directory (load_any)
    task: str = "arith"
    task_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    steps: int = 20
    prompts_per_step: int = 8
    updates_per_batch: int = 4
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    dynamic_sampling: bool | None = None  # None: on for DAPO only
    optimizer: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(
        learning_rate=1e-4, warmup_steps=0, schedule="constant", eps=1e-15, weight_decay=0.0))
    seed: int = 0
    checkpoint_every: int = 0  # generation batches; 0: only at the end
    keep_checkpoints: int = 3
    eval_every: int = 0  # greedy accuracy on held-out prompts every N steps (0: at the start and the end only)
    eval_prompts: int = 128  # 0: no evaluation
    mesh: dict[str, int] | None = None
    progress: bool = True  # say on stderr that the run resumes, and (without a callback) one line per step
    tensorboard: bool = False  # also write TensorBoard events under out/tensorboard (needs tensorboardX)
    token_stats: bool = False  # write out/tokens.jsonl: which tokens left the clip band (`clip_token_stats`)

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "updates_per_batch", "keep_checkpoints"):
            harness.check_count(getattr(self, name), name, 1)
        for name in ("checkpoint_every", "eval_every", "eval_prompts"):
            harness.check_count(getattr(self, name), name, 0)
        rows = self.prompts_per_step * self.rollout.group_size
        if rows % self.updates_per_batch:
            raise ValueError(f"prompts_per_step * group_size = {rows} responses do not split into updates_per_batch="
                             f"{self.updates_per_batch} equal minibatches; pick sizes where it divides")

    @property
    def minibatch_size(self) -> int:
        return self.prompts_per_step * self.rollout.group_size // self.updates_per_batch

    @property
    def uses_dynamic_sampling(self) -> bool:
        return self.loss.algo == "dapo" if self.dynamic_sampling is None else self.dynamic_sampling


@dataclasses.dataclass
class RLResult:
    config: M1Config
    state: TrainState
    history: list[dict]
    final_eval: dict
    resumed_from: int | None


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of generation batch `step`: a pure function of (seed, step)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def greedy_accuracy(model: M1ForCausalLM, params, task, count: int, max_new_tokens: int,
                    tokenizer=ByteTokenizer()) -> float:
    """Fraction of `count` held-out prompts (the task under another seed) answered exactly by greedy decoding."""
    held_out = dataclasses.replace(task, seed=task.seed + harness.HELD_OUT_SEED_OFFSET)
    examples = held_out.examples(0, count)
    out = generate(model, params, [tokenizer.encode(e["prompt"]) for e in examples], max_new_tokens=max_new_tokens,
                   stop_ids=(NEWLINE_ID, tokenizer.eos_id), pad_id=tokenizer.pad_id)
    texts = [decode_completion(tokenizer, c) for c in out.completions]
    return float(np.mean([task.is_correct(t, e) for t, e in zip(texts, examples)]))


PROGRESS_FIELDS = (("reward", "reward_mean", ".3f"), ("acc", "accuracy", ".3f"), ("loss", "loss", ".4f"),
                   ("clip_high", "clip_high_frac", ".3f"))


def progress_fields(record: dict) -> dict[str, str]:
    """A step's headline numbers, formatted: the per-step line's and the `m1jax rl` bar's."""
    return {name: format(record[key], spec) for name, key, spec in PROGRESS_FIELDS if key in record}


def _print_step(steps: int) -> Callable[[int, dict], None]:
    def line(step: int, record: dict) -> None:
        fields = " ".join(f"{k} {v}" for k, v in progress_fields(record).items())
        print(f"rl step {step}/{steps} {fields} ({record['step_seconds']:.1f}s)", file=sys.stderr, flush=True)
    return line


@dataclasses.dataclass
class _Run:
    """What stays fixed through a run: the settings, the task, the policy's model and its compiled update."""

    cfg: RLConfig
    task: Any
    model: M1ForCausalLM
    update: Callable
    schedule: Callable
    mesh: Any  # None: one device
    batch_shardings: dict | None
    reference: Any  # GRPO's KL term: the initial parameters in buffers of their own (None: no KL term)
    data_key: dict  # what the checkpoints' prompts were: a resume on other prompts is refused
    tokenizer: Any


def _load_policy(cfg: RLConfig, policy) -> tuple[M1Config, Any]:
    if policy is not None:
        return policy
    if cfg.init is None:
        raise ValueError("no initial policy: pass RLConfig.init (a training output or Hugging Face directory)")
    return load_any(cfg.init)


def _check_model(out: str, config: M1Config, tokenizer, max_len: int) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the task's tokenizer has {tokenizer.vocab_size} ids but the model only "
                         f"{config.vocab_size}; start from a model trained on the task's tokens")
    if max_len > config.max_position_embeddings:
        raise ValueError(f"prompt + max_new_tokens = {max_len} exceeds max_position_embeddings="
                         f"{config.max_position_embeddings}; lower max_new_tokens")
    harness.check_same_model(out, config)


@functools.lru_cache(maxsize=8)
def _single_device_update(model: M1ForCausalLM, opt_cfg: OptimizerConfig, loss_cfg: LossConfig,
                          temperature: float, token_stats: bool = False) -> Callable:
    """One compiled update per (model, optimizer, loss, temperature): runs in one process (an experiment's seeds
    and algorithms, a resumed run) share it."""
    return make_update_step(model, make_optimizer(opt_cfg), loss_cfg, temperature=temperature,
                            token_stats=token_stats)


def _start(cfg: RLConfig, task, policy) -> tuple[_Run, TrainCheckpoints, TrainState, int | None]:
    """(the run, its checkpoints, the state to continue from, the step it resumes from or None): the policy loaded
    and checked, the state restored (or fresh), the update compiled for one device or the mesh, the run files."""
    config, init_params = _load_policy(cfg, policy)
    tokenizer = ByteTokenizer()
    _check_model(cfg.out, config, tokenizer, task.max_prompt_len + cfg.rollout.max_new_tokens)
    os.makedirs(cfg.out, exist_ok=True)
    model = M1ForCausalLM(config)
    opt_cfg, optimizer, schedule = harness.optimizer_for(cfg.optimizer, cfg.steps * cfg.updates_per_batch)

    def fresh_state():  # the update donates the state: copy parameters the caller still holds
        params = init_params if policy is None else jax.tree.map(jnp.copy, init_params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                          rng=jax.random.key_data(jax.random.key(cfg.seed)))

    abstract = jax.eval_shape(fresh_state)
    mesh = shardings = batch_shardings = None
    if cfg.mesh:
        mesh, shardings, batch_shardings = mesh_shardings(cfg.mesh, config, abstract, optimizer, cfg.minibatch_size,
                                                          with_reference=bool(cfg.loss.beta))
    placement = harness.placement(abstract, shardings)
    data_key = {"task": task.name, **task.options(), "prompts_per_step": cfg.prompts_per_step}
    checkpoints = harness.checkpoints(cfg.out, cfg.keep_checkpoints)
    restored = harness.resume(checkpoints, abstract, shardings, out=cfg.out, steps=cfg.steps,
                              quiet=not cfg.progress)
    if restored is not None:
        resumed_from, state, meta = restored
        if meta.get("data") != data_key:
            raise ValueError(f"{cfg.out} was trained on other prompts ({meta.get('data')}), not {data_key}; "
                             "use a new --out or the same task options and seed")
    else:
        resumed_from, state = None, jax.device_put(fresh_state(), placement)
    reference = None
    if cfg.loss.beta:
        reference = jax.device_put(jax.tree.map(jnp.copy, init_params), placement.params)
    if shardings is None:
        update = _single_device_update(model, opt_cfg, cfg.loss, float(cfg.rollout.temperature), cfg.token_stats)
    else:
        update = make_update_step(model.clone(mesh=mesh), optimizer, cfg.loss, temperature=cfg.rollout.temperature,
                                  state_shardings=shardings, batch_shardings=batch_shardings,
                                  token_stats=cfg.token_stats)
    harness.write_run_files(cfg.out, config, RUN_CONFIG_FILE, cfg)
    run = _Run(cfg, task, model, update, schedule, mesh, batch_shardings, reference, data_key, tokenizer)
    return run, checkpoints, state, resumed_from


def _update_batch(rollout: Rollout, keep_rows: np.ndarray, ref_logprobs) -> dict[str, np.ndarray]:
    batch = rollout.batch()
    batch["response_mask"] = batch["response_mask"] * keep_rows[:, None].astype(np.float32)
    if ref_logprobs is not None:
        batch["ref_logprobs"] = ref_logprobs
    return batch


def _generation_batch(run: _Run, params, step: int) -> tuple[Rollout, np.ndarray, dict[str, np.ndarray]]:
    """(rollout, kept groups (N,) bool, the update batch) of generation batch `step`: G responses per prompt from
    the current policy, dynamic sampling's filter, and the reference's log-probabilities for GRPO's KL term."""
    cfg = run.cfg
    rollout = collect_rollout(run.model, params, run.task.examples(step, cfg.prompts_per_step), config=cfg.rollout,
                              seed=step_seed(cfg.seed, step), reward_fn=run.task.reward_fn, tokenizer=run.tokenizer,
                              prompt_width=run.task.max_prompt_len)
    group = cfg.rollout.group_size
    grouped = rollout.rewards.reshape(-1, group)
    keep_groups = (np.asarray(losses.dynamic_sampling_filter(grouped)) if cfg.uses_dynamic_sampling
                   else np.ones(len(grouped), bool))
    ref_logprobs = None
    if run.reference is not None:
        ref_logprobs = np.asarray(score_responses(
            run.model, run.reference, jnp.asarray(rollout.tokens), jnp.asarray(rollout.segment_ids),
            cfg.rollout.max_new_tokens, float(cfg.rollout.temperature))[0])
    return rollout, keep_groups, _update_batch(rollout, np.repeat(keep_groups, group), ref_logprobs)


def _updates(run: _Run, state: TrainState, batch: dict, parts: list[np.ndarray]) -> tuple[TrainState, list[dict]]:
    """One optimizer update per minibatch (the rows in each part), in order; their metrics on the host."""
    metrics = []
    with harness.mesh_context(run.mesh):
        for rows in parts:
            state, m = run.update(state, harness.to_device({k: v[rows] for k, v in batch.items()},
                                                           run.batch_shardings))
            metrics.append(m)
    return state, jax.device_get(metrics)


def _token_stats(run: _Run, rollout: Rollout, batch: dict, parts, update_metrics: list[dict]) -> dict:
    """clip_token_stats of the batch, each token's ratio taken at its own update (popped from update_metrics)."""
    ratios = np.ones_like(batch["response_mask"])
    for rows, metrics in zip(parts, update_metrics):
        ratios[rows] = metrics.pop("token_ratio")
    task = run.task  # a task with roles of its own (e.g. countdown's fork tokens) labels its tokens itself
    roles = {"roles_fn": task.token_roles, "role_names": task.token_role_names} if hasattr(task, "token_roles") else {}
    return clip_token_stats(rollout, ratios, batch["response_mask"], run.cfg.loss, **roles)


def _step_metrics(run: _Run, rollout: Rollout, keep_groups: np.ndarray, update_metrics: list[dict],
                  step: int) -> dict:
    """The generation batch's line of metrics.jsonl, but for its timings: the rollout's numbers and the means of
    its updates' (grad_norm_max their largest gradient norm)."""
    means = {k: float(np.mean([m[k] for m in update_metrics])) for k in update_metrics[0]}
    means["grad_norm_max"] = float(np.max([m["grad_norm"] for m in update_metrics]))
    grouped = rollout.rewards.reshape(-1, run.cfg.rollout.group_size)
    return dict(
        reward_mean=float(rollout.rewards.mean()), accuracy=accuracy(rollout, run.task.is_correct),
        response_length=float(rollout.response_lengths.mean()),
        entropy_rollout=float(rollout.entropy.sum() / max(rollout.response_mask.sum(), 1.0)),
        kept_groups_frac=float(keep_groups.mean()), solved_groups_frac=float(np.mean(grouped.min(axis=1) > 0)),
        reward_errors=rollout.reward_stats["errors"], **rollout.mismatch,
        **{k: v for k, v in means.items() if k != "num_tokens"},
        loss_first_update=float(update_metrics[0]["loss"]),
        lr=float(run.schedule(step * run.cfg.updates_per_batch)))


def _evaluate(run: _Run, params) -> float:
    cfg = run.cfg
    return greedy_accuracy(run.model, params, run.task, cfg.eval_prompts, cfg.rollout.max_new_tokens, run.tokenizer)


def _rl_step(run: _Run, state: TrainState, step: int, tokens_file) -> tuple[TrainState, dict]:
    """Generation batch `step`: sample, score, then updates_per_batch updates over a shuffle of its responses."""
    cfg = run.cfg
    begin = time.perf_counter()
    record = {"step": step + 1}
    if step == 0 and cfg.eval_prompts:
        record["eval_accuracy_initial"] = _evaluate(run, state.params)
    rollout, keep_groups, batch = _generation_batch(run, state.params, step)
    rollout_seconds = time.perf_counter() - begin
    order = np.random.default_rng([cfg.seed, step]).permutation(len(rollout.rewards))
    parts = np.split(order, cfg.updates_per_batch)
    state, update_metrics = _updates(run, state, batch, parts)
    if tokens_file is not None:
        tokens_file.write(json.dumps({"step": step + 1, **_token_stats(run, rollout, batch, parts, update_metrics)})
                          + "\n")
        tokens_file.flush()
    record.update(_step_metrics(run, rollout, keep_groups, update_metrics, step), updates=int(state.step),
                  rollout_seconds=rollout_seconds, step_seconds=time.perf_counter() - begin)
    return state, record


def train_rl(cfg: RLConfig, *, policy: tuple[M1Config, Any] | None = None, task: Any = None,
             callback: Callable[[int, dict], None] | None = None) -> RLResult:
    """Run (or resume) RL into cfg.out. callback(step, record) after each generation batch's metrics line (without
    one, cfg.progress prints a line per step).

    policy: (config, params) instead of loading cfg.init. task: an object like `ArithPrompts` (name, seed,
    max_prompt_len, examples(step, count), reward_fn, is_correct, options()) instead of cfg.task.
    """
    task = get_rl_task(cfg.task, seed=cfg.seed, **cfg.task_options) if task is None else task
    run, checkpoints, state, resumed_from = _start(cfg, task, policy)
    if callback is None and cfg.progress:
        callback = _print_step(cfg.steps)
    start = resumed_from or 0
    history: list[dict] = []
    tokens_file = _tokens_log(os.path.join(cfg.out, TOKENS_FILE), start) if cfg.token_stats else None
    try:
        with harness.run_log(cfg.out, start, cfg.tensorboard) as run_log:
            for step in range(start, cfg.steps):
                state, record = _rl_step(run, state, step, tokens_file)
                done = step + 1
                if cfg.eval_prompts and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
                    record["eval_accuracy"] = _evaluate(run, state.params)
                if harness.checkpoint_due(done, cfg.checkpoint_every, cfg.steps):
                    checkpoints.save(done, state, {"step": done, "data": run.data_key})
                run_log.write(record)
                history.append(record)
                if callback is not None:
                    callback(done, record)
    finally:
        checkpoints.close()
        if tokens_file is not None:
            tokens_file.close()
    final_eval = {"eval_accuracy": history[-1]["eval_accuracy"]} if history and cfg.eval_prompts else {}
    return RLResult(run.model.config, state, history, final_eval, resumed_from)
