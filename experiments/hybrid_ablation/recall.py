"""State-binding recall on the device: MQAR and needle batches drawn inside jit, and population training.

One source of truth for the hybrid ablation (`run.py` here) and the length extrapolation
(`experiments/length_extrapolation/run.py`).

MQAR in Zoology's layout (Arora et al. 2023, arXiv 2312.04927), row of T + 1 tokens (inputs S[:-1], targets S[1:]):

    k_1 v_1 ... k_P v_P  0 0 q_1 a_1 0 0 0 0 q_2 a_2 ...      (0: filler)

P pairs with distinct keys (ids 1..K) and random values (ids K+1..V-1) at the start; then every stored key is
queried once, in random order, at random even offsets of the rest of the row; the graded target is the value after
each query key. Spreading the same P pairs over a longer row (larger T) moves queries away from their keys: the
length-extrapolation probe. Needle: one pair at a random even depth of a filler row, its key asked at the end.

A linear-attention layer stores sum_t decay^(i-t) k_t^T v_t in an H x D x D state: once P distinct keys outgrow
what that state separates, recall must fail, while softmax attention reads every past token. The population
trainer vmaps (or lax.maps) one train step over members (learning rate, seed): one compile per architecture.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from m1jax.config import LIGHTNING, SOFTMAX, M1Config, RunPolicy, deepnorm_alpha, m1_schedule
from m1jax.model import M1ForCausalLM

FILLER = 0


# ----- data -----
def check_layout(seq_len: int, max_pairs: int, vocab: int) -> int:
    """The number of keys K = (vocab - 1) // 2; raises unless max_pairs distinct keys and their queries fit."""
    num_keys = (vocab - 1) // 2
    if max_pairs < 1 or max_pairs > num_keys:
        raise ValueError(f"max_pairs={max_pairs} must be in [1, {num_keys}] for vocab={vocab}; raise vocab")
    if 4 * max_pairs > seq_len:
        raise ValueError(f"seq_len={seq_len} cannot hold {max_pairs} pairs and their queries (4 tokens each); "
                         f"use seq_len >= {4 * max_pairs} or fewer pairs")
    return num_keys


def _mqar_row(key, pairs, max_pairs: int, seq_len: int, num_keys: int, vocab: int):
    """One row: pairs () int32 <= max_pairs -> (tokens (T+1,) int32, graded (T+1,) bool)."""
    k_keys, k_values, k_order, k_slots = jax.random.split(key, 4)
    index = jnp.arange(max_pairs)
    live = index < pairs
    keys = jax.random.permutation(k_keys, num_keys)[:max_pairs] + 1
    values = jax.random.randint(k_values, (max_pairs,), num_keys + 1, vocab)
    # queries ask the live pairs in random order: argsort of uniforms with the dead pairs pushed last
    order = jnp.argsort(jnp.where(live, jax.random.uniform(k_order, (max_pairs,)), 2.0))
    # query i sits in a random free 2-token slot after the pairs: slot j at 2P + 2j, j < (T - 2P) // 2
    num_slots = (seq_len - 2 * pairs) // 2
    slot_ids = jnp.arange(seq_len // 2)
    slots = jnp.argsort(jnp.where(slot_ids < num_slots, jax.random.uniform(k_slots, (seq_len // 2,)), 2.0))
    drop = seq_len + 1  # out of bounds: scatters with mode="drop" skip it
    tokens = jnp.full((seq_len + 1,), FILLER, jnp.int32)
    tokens = tokens.at[jnp.where(live, 2 * index, drop)].set(keys, mode="drop")
    tokens = tokens.at[jnp.where(live, 2 * index + 1, drop)].set(values, mode="drop")
    query_at = jnp.where(live, 2 * pairs + 2 * slots[:max_pairs], drop)
    tokens = tokens.at[query_at].set(keys[order], mode="drop")
    tokens = tokens.at[query_at + 1].set(values[order], mode="drop")
    graded = jnp.zeros((seq_len + 1,), bool).at[query_at + 1].set(True, mode="drop")
    return tokens, graded


def _as_batch(tokens, graded, pairs):
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": graded[:, 1:].astype(jnp.float32),
            "pairs": pairs}


def mqar_batch(key, pairs, max_pairs: int, seq_len: int, vocab: int) -> dict:
    """pairs: (B,) int32, each in [1, max_pairs] -> {"inputs", "targets" (B, T) int32, "mask" (B, T) float32
    (1 at graded answers), "pairs" (B,)}. Traceable: the training step draws its batches inside jit."""
    check_layout(seq_len, max_pairs, vocab)
    return _mqar_batch(key, pairs, max_pairs, seq_len, vocab)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _mqar_batch(key, pairs, max_pairs, seq_len, vocab):
    num_keys = (vocab - 1) // 2
    keys = jax.random.split(key, pairs.shape[0])
    tokens, graded = jax.vmap(lambda k, p: _mqar_row(k, p, max_pairs, seq_len, num_keys, vocab))(keys, pairs)
    return _as_batch(tokens, graded, pairs)


def hide_answers(batch: dict) -> dict:
    """The batch with each graded answer removed from the inputs (FILLER in its place), as in Zoology's MQAR, where
    the token after a query key is not the answer. `mqar_batch` rows are a shifted token stream, so the answer
    to a query also sits in the inputs one position later, where every later query sees it: a model that never
    matches keys then learns to name the row's values not yet answered, which alone scores sum_{k<=P} 1/k / P
    (52% / 34% / 21% / 13% at P = 4 / 8 / 16 / 32) and is a trap training does not leave. The targets and the mask
    are unchanged; a needle's answer is the row's last target, not an input, so needle rows pass through."""
    answer_next = jnp.concatenate([jnp.zeros_like(batch["mask"][:, :1]), batch["mask"][:, :-1]], axis=1) > 0
    return dict(batch, inputs=jnp.where(answer_next, FILLER, batch["inputs"]))


def needle_batch(key, batch: int, seq_len: int, vocab: int) -> dict:
    """One pair at a random even depth, filler elsewhere, its key asked as the last input token.
    Returns mqar_batch's dict plus "depth" (B,) int32, the needle's position."""
    check_layout(seq_len, 1, vocab)
    return _needle_batch(key, batch, seq_len, vocab)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _needle_batch(key, batch, seq_len, vocab):
    num_keys = (vocab - 1) // 2
    k_key, k_value, k_depth = jax.random.split(key, 3)
    needle = jax.random.randint(k_key, (batch,), 1, num_keys + 1)
    value = jax.random.randint(k_value, (batch,), num_keys + 1, vocab)
    depth = 2 * jax.random.randint(k_depth, (batch,), 0, (seq_len - 2) // 2)
    rows = jnp.arange(batch)
    tokens = jnp.full((batch, seq_len + 1), FILLER, jnp.int32)
    tokens = tokens.at[rows, depth].set(needle).at[rows, depth + 1].set(value)
    tokens = tokens.at[:, seq_len - 1].set(needle).at[:, seq_len].set(value)
    graded = jnp.zeros((batch, seq_len + 1), bool).at[:, seq_len].set(True)
    out = _as_batch(tokens, graded, jnp.ones((batch,), jnp.int32))
    out["depth"] = depth
    return out


# ----- models -----
@dataclasses.dataclass(frozen=True)
class Arm:
    """One architecture of the ablation: `softmax_layers` of `num_layers`, evenly spaced with the last layer
    softmax (M1's schedule), or placed by `pattern`, one letter per layer from the first: S softmax, L lightning
    (e.g. "SL": a softmax layer under a lightning one). short_conv > 0 gives every lightning layer a causal
    depthwise convolution of that width on its q, k, v (`M1Config.lightning_short_conv`; M1 has none)."""
    name: str
    num_layers: int
    softmax_layers: int
    num_heads: int
    head_dim: int
    pattern: str = ""
    short_conv: int = 0

    @property
    def layer_types(self) -> tuple[str, ...]:
        if self.pattern:
            if len(self.pattern) != self.num_layers or set(self.pattern) - {"S", "L"}:
                raise ValueError(f"arm {self.name}: pattern {self.pattern!r} needs one letter S or L for each of "
                                 f"num_layers={self.num_layers} layers")
            return tuple(SOFTMAX if c == "S" else LIGHTNING for c in self.pattern)
        if self.softmax_layers == 0:
            return (LIGHTNING,) * self.num_layers
        if self.num_layers % self.softmax_layers:
            raise ValueError(f"arm {self.name}: softmax_layers={self.softmax_layers} must divide "
                             f"num_layers={self.num_layers}")
        return m1_schedule(self.num_layers, period=self.num_layers // self.softmax_layers)

    @property
    def state_floats(self) -> int:
        """Lightning state per layer, H * D * D floats (0 for softmax-only)."""
        return 0 if self.softmax_layers == self.num_layers else self.num_heads * self.head_dim ** 2


def arm_config(arm: Arm, width: int, vocab: int) -> M1Config:
    """Same width, vocab, MLP and norms for every arm; one dense SwiGLU expert (the ablation is about attention)."""
    alpha = deepnorm_alpha(arm.num_layers)
    return M1Config(
        vocab_size=vocab, hidden_size=width, num_heads=arm.num_heads, num_kv_heads=arm.num_heads,
        head_dim=arm.head_dim, num_experts=1, experts_per_token=1, expert_size=2 * width,
        layer_types=arm.layer_types, rope_theta=10_000.0, rotary_dim=arm.head_dim // 2,
        max_position_embeddings=1 << 20, lightning_alpha=alpha, softmax_alpha=alpha, mlp_alpha=alpha,
        router_aux_loss_coef=0.0, lightning_short_conv=arm.short_conv)


def dense_expert(lhs, rhs, group_sizes):
    """The grouped matmul of a one-expert MoE: every row belongs to expert 0. (M, K), (1, K, N) -> (M, N)."""
    del group_sizes
    return lhs @ rhs[0]


def use_lightning_impl(impl: str):
    """Run the model's lightning layers through lightning_attention(impl=...): "auto" (Pallas on GPU), "chunked"
    (pure JAX), a fallback for when a Pallas kernel cannot run under the population's vmap."""
    import functools

    import m1jax.layers.lightning_attention as layer
    from pallas_kernels.lightning_attention import lightning_attention
    layer.lightning_attention = functools.partial(lightning_attention, impl=impl)


def make_model(config: M1Config, policy: RunPolicy = RunPolicy()) -> M1ForCausalLM:
    if config.num_experts != 1:
        raise ValueError("the recall models use one dense expert (num_experts=1)")
    return M1ForCausalLM(config, policy, grouped_matmul=dense_expert)


def count_params(config: M1Config) -> int:
    shapes = jax.eval_shape(lambda k: make_model(config).init(k, jnp.zeros((1, 8), jnp.int32))["params"],
                            jax.random.key(0))
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)))


# ----- population training -----
@dataclasses.dataclass(frozen=True)
class Recipe:
    seq_len: int
    pair_choices: tuple[int, ...]
    vocab: int
    batch_size: int
    steps: int
    chunk: int  # steps per compiled call (scan); host sees losses only every chunk
    warmup: int
    weight_decay: float = 0.1
    population: str = "vmap"  # "vmap" or "map" (lax.map: members one after another, no batching rules needed)


def schedule(step, total, warmup: int):
    """Linear warmup to 1 over `warmup` steps, then cosine to 0.1 at step `total` (a traced scalar: the run may
    shorten its plan after timing its first chunks)."""
    step = step.astype(jnp.float32)
    warm = jnp.minimum(1.0, (step + 1) / max(warmup, 1))
    progress = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
    return warm * (0.1 + 0.9 * 0.5 * (1 + jnp.cos(jnp.pi * progress)))


def _population(fn: Callable, mode: str):
    if mode == "vmap":
        return jax.vmap(fn)
    if mode == "map":
        return lambda *args: jax.lax.map(lambda a: fn(*a), args)
    raise ValueError(f"population={mode!r}; use 'vmap' or 'map'")


def masked_metrics(logits, batch):
    """(loss, correct (B, T) float32) over the graded positions."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["mask"]
    loss = jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32) * mask
    return loss, correct


class Population:
    """Members (lr_i, seed_i) of one architecture trained side by side. params / opt state carry a leading axis M."""

    def __init__(self, config: M1Config, recipe: Recipe, lrs, seeds, policy: RunPolicy = RunPolicy()):
        self.config, self.recipe = config, recipe
        self.model = make_model(config, policy)
        self.lrs = jnp.asarray(lrs, jnp.float32)
        self.seeds = jnp.asarray(seeds, jnp.uint32)
        self.tx = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(b1=0.9, b2=0.98))
        self._chunk = jax.jit(self._train_chunk, donate_argnums=(0, 1))
        self._eval = {}

    def init(self):
        def one(seed):
            params = self.model.init(jax.random.fold_in(jax.random.key(seed), 1),
                                     jnp.zeros((1, 8), jnp.int32))["params"]
            return params, self.tx.init(params)
        return jax.jit(_population(one, self.recipe.population))(self.seeds)

    def _batch(self, seed, step):
        r = self.recipe
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 2), step)
        k_pairs, k_rows = jax.random.split(key)
        pairs = jnp.asarray(r.pair_choices, jnp.int32)[
            jax.random.randint(k_pairs, (r.batch_size,), 0, len(r.pair_choices))]
        return hide_answers(mqar_batch(k_rows, pairs, max(r.pair_choices), r.seq_len, r.vocab))

    def _member_step(self, params, opt_state, lr, seed, step, total):
        batch = self._batch(seed, step)

        def loss_fn(p):
            return masked_metrics(self.model.apply({"params": p}, batch["inputs"]).logits, batch)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        scale = lr * schedule(step, total, self.recipe.warmup)
        params = jax.tree.map(lambda p, u: p - scale * (u + self.recipe.weight_decay * p * (p.ndim > 1)),
                              params, updates)
        return params, opt_state, loss

    def _train_chunk(self, params, opt_state, start, total):
        def body(carry, step):
            params, opt_state = carry
            params, opt_state, loss = _population(
                lambda p, o, lr, s: self._member_step(p, o, lr, s, step, total), self.recipe.population)(
                params, opt_state, self.lrs, self.seeds)
            return (params, opt_state), loss
        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state),
                                                   start + jnp.arange(self.recipe.chunk))
        return params, opt_state, losses.mean(0)

    def train_chunk(self, params, opt_state, start: int, total: int | None = None):
        """recipe.chunk steps from `start` of a run of `total` steps (default recipe.steps); returns
        (params, opt_state, mean loss per member (M,))."""
        total = self.recipe.steps if total is None else total
        return self._chunk(params, opt_state, jnp.int32(start), jnp.float32(total))

    def evaluate(self, params, batch: dict) -> np.ndarray:
        """batch (same for every member, B rows) -> correct (M, B, T) float32 on the host. The answers are hidden
        from the inputs (`hide_answers`), as in training."""
        shape = batch["inputs"].shape
        if shape not in self._eval:
            def one(p, b):
                return masked_metrics(self.model.apply({"params": p}, b["inputs"]).logits, b)[1]
            self._eval[shape] = jax.jit(lambda ps, b: _population(lambda p: one(p, b), self.recipe.population)(ps))
        batch = hide_answers({k: jnp.asarray(batch[k]) for k in ("inputs", "targets", "mask")})
        return np.asarray(self._eval[shape](params, batch))


def accuracy_by(correct: np.ndarray, batch: dict, field: str) -> dict:
    """correct (M, B, T) -> {value of batch[field]: accuracy (M,) list} over graded positions."""
    mask = np.asarray(batch["mask"])
    groups = np.asarray(batch[field])
    out = {}
    for value in np.unique(groups):
        rows = groups == value
        graded = mask[rows].sum()
        name = int(value) if np.issubdtype(groups.dtype, np.integer) else str(value)
        out[name] = (correct[:, rows].sum(axis=(1, 2)) / max(graded, 1)).tolist()
    return out


def eval_batch(seed: int, pair_values, rows_each: int, seq_len: int, vocab: int) -> dict:
    """Held-out MQAR rows (seed's stream 3): rows_each rows for every number of pairs, concatenated."""
    pairs = jnp.repeat(jnp.asarray(pair_values, jnp.int32), rows_each)
    return mqar_batch(jax.random.fold_in(jax.random.key(seed), 3), pairs, max(pair_values), seq_len, vocab)
