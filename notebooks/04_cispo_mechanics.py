# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # CISPO mechanics: one batch through CISPO, PPO-clip, DAPO and GRPO
#
# Every objective here pushes up $\log \pi_\theta(o_t)$ of a sampled token in proportion to its advantage $A$,
# reweighted by the importance ratio $r_t = \pi_\theta(o_t) / \pi_{old}(o_t)$ because the batch is reused for
# several updates. They differ in what happens when $r_t$ leaves a band around 1:
#
# - **PPO-clip** ($\epsilon = 0.2$), **DAPO** (clip-higher, $[1 - 0.2, 1 + 0.28]$) and **GRPO** (PPO-clip, mean per
#   response) take $\min(rA, \mathrm{clip}(r)A)$: a token with $A > 0$ and $r$ above the band (or $A < 0$ and $r$
#   below it) gets **zero gradient**; it is silenced for the rest of the batch's updates.
# - **CISPO** (MiniMax-M1) clips the weight, not the token: $J = \frac{1}{\sum|o_i|}\sum_{i,t}
#   \mathrm{sg}(\mathrm{clip}(r_{i,t}, 0, 1 + \epsilon_{high}))\, A_{i,t} \log\pi_\theta(o_{i,t})$. Every token keeps
#   a gradient; a runaway ratio only stops growing its weight. The paper argues the silenced tokens are the rare,
#   high-information "fork" tokens of long reasoning chains, which PPO-style clipping throws away after the first
#   update.
#
# Below, a tiny model learns a little arithmetic, samples G answers per prompt (a real rollout through the
# inference engine, rewarded by the verifier), takes a few off-policy CISPO steps so the ratios drift from 1, and
# then the same batch goes through the four losses of `m1jax.rl.losses`. The per-token weight of an objective is
# $\partial J / \partial \log\pi_\theta(o_t)$, read with `jax.grad`; the parameter gradient is that weight pulled back
# through the model.
# budget: 75 s

# %%
import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import optax

import m1jax
from m1jax.rl import RolloutConfig, cispo_loss, collect_rollout, dapo_loss, get_rl_task, grpo_loss, ppo_clip_loss
from m1jax.rl.rollout import response_terms
from m1jax.train.data import make_data

DIGITS, OPS = 1, "+-"
PRETRAIN_STEPS, PRETRAIN_LR = 120, 4e-3
PROMPTS, GROUP, MAX_NEW_TOKENS, TEMPERATURE = 8, 8, 4, 1.0
OFF_POLICY_UPDATES, UPDATE_LR = 3, 1e-3  # how far the policy drifts from the one that sampled

config = m1jax.M1Config.from_preset("tiny", vocab_size=260, layer_types=("lightning", "softmax"))  # 2 layers: fast CI
model = m1jax.M1ForCausalLM(config)

# %% [markdown]
# ## A policy worth sampling: a few seconds of pretraining on 1-digit arithmetic

# %%
data = make_data("arith", batch_size=32, seq_len=64, seed=0, vocab_size=config.vocab_size, digits=DIGITS, ops=OPS)
warmup = optax.linear_schedule(0.0, PRETRAIN_LR, 30)
pretrain_opt = optax.adamw(warmup, b1=0.9, b2=0.95, weight_decay=0.0)


@jax.jit
def pretrain_step(params, opt_state, batch):
    def ce(p):
        logits = model.apply({"params": p}, batch["inputs"], segment_ids=batch["segment_ids"]).logits
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
        return jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])
    loss, grads = jax.value_and_grad(ce)(params)
    updates, opt_state = pretrain_opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


params = jax.jit(m1jax.init_params, static_argnums=0)(config, jax.random.key(0))
opt_state = pretrain_opt.init(params)
for step in range(PRETRAIN_STEPS):
    params, opt_state, loss = pretrain_step(params, opt_state, {k: jnp.asarray(v) for k, v in data.batch(step).items()})
print(f"answer loss after {PRETRAIN_STEPS} steps: {float(loss):.3f}")

# %% [markdown]
# ## A real rollout: G samples per prompt, verifier rewards, group-relative advantages
# `collect_rollout` samples through the inference engine (prefill + decode loop), scores each completion with the
# arithmetic verifier, and sets $A_i = (R_i - \mathrm{mean}_{group} R) / (\mathrm{std}_{group} R + \epsilon)$.
# A group where every sample is right (or every one wrong) has $A = 0$: no objective learns from it.

# %%
task = get_rl_task("arith", digits=DIGITS, ops=OPS)
rollout = collect_rollout(model, params, task.examples(0, PROMPTS),
                          config=RolloutConfig(group_size=GROUP, max_new_tokens=MAX_NEW_TOKENS,
                                               temperature=TEMPERATURE, sampler_logprobs="forward"), seed=0)
for g in range(PROMPTS):
    rows = slice(g * GROUP, (g + 1) * GROUP)
    example = rollout.examples[g * GROUP]  # one entry per sampled row, the G rows of a prompt adjacent
    answers = " ".join(repr(c.strip()) for c in rollout.completions[rows])
    print(f"{example['prompt']:>6s} {example['answer']:>3s} | reward {rollout.rewards[rows].mean():.2f} | "
          f"A[0] {rollout.advantages[rows][0]:+.2f} | {answers}")
print(f"mean reward {rollout.rewards.mean():.2f}; tokens with A != 0: "
      f"{(rollout.response_mask * (rollout.advantages[:, None] != 0)).sum():.0f} of {rollout.response_mask.sum():.0f}")

# %% [markdown]
# ## Off-policy drift
# The batch is reused for several updates (M1 and DAPO both do), so by the later updates $\pi_\theta$ is no longer
# the policy that sampled. A few CISPO steps on this batch move the ratios away from 1.

# %%
tokens, segment_ids = jnp.asarray(rollout.tokens), jnp.asarray(rollout.segment_ids)
mask, advantages = jnp.asarray(rollout.response_mask), jnp.asarray(rollout.advantages)
old_logprobs = jnp.asarray(rollout.old_logprobs)
T = mask.shape[1]


def policy_logprobs(p):
    """(B, T) log pi_theta of the sampled response tokens."""
    return response_terms(model, p, tokens, segment_ids, T, TEMPERATURE)[0]


update_opt = optax.adam(UPDATE_LR)


@jax.jit
def cispo_update(p, state):
    grads = jax.grad(lambda q: cispo_loss(policy_logprobs(q), old_logprobs, advantages, mask)[0])(p)
    updates, state = update_opt.update(grads, state, p)
    return optax.apply_updates(p, updates), state


policy, state = params, update_opt.init(params)
for _ in range(OFF_POLICY_UPDATES):
    policy, state = cispo_update(policy, state)
logprobs, pullback = jax.vjp(jax.jit(policy_logprobs), policy)
ratio = np.asarray(jnp.exp(logprobs - old_logprobs))
valid = np.asarray(mask) > 0
print(f"ratio over response tokens: min {ratio[valid].min():.2f}, median {np.median(ratio[valid]):.2f}, "
      f"max {ratio[valid].max():.2f}; outside [0.8, 1.28]: {np.mean((ratio[valid] < 0.8) | (ratio[valid] > 1.28)):.0%}")

# %% [markdown]
# ## The same batch through the four objectives
# Each loss is a function of the per-token log-probabilities, so `jax.grad` with respect to them gives each token's
# weight in the update (the losses return $-J$, so the weight is minus that gradient). A token is **silenced**
# when its advantage is not zero but its weight is. DAPO can differ from PPO-clip only on tokens with $A > 0$ and
# $1.2 < r \le 1.28$ (its higher upper bound); GRPO silences the same tokens as PPO-clip but averages per
# response, which changes the scale of the others.

# %%
objectives = {
    "CISPO": lambda lp: cispo_loss(lp, old_logprobs, advantages, mask)[0],
    "PPO-clip": lambda lp: ppo_clip_loss(lp, old_logprobs, advantages, mask)[0],
    "DAPO": lambda lp: dapo_loss(lp, old_logprobs, advantages, mask)[0],
    "GRPO": lambda lp: grpo_loss(lp, old_logprobs, advantages, mask)[0],  # no KL term here: compare the clipping
}
token_weights, param_grads = {}, {}
for name, loss_fn in objectives.items():
    weight = -jax.grad(loss_fn)(logprobs)  # (B, T): dJ / dlog pi(o_t)
    token_weights[name] = np.asarray(weight)
    param_grads[name] = pullback(-weight)[0]  # d(-J)/dtheta, the gradient the optimiser sees

learning = valid & (np.asarray(advantages)[:, None] != 0)
flat = lambda tree: jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])
reference = flat(param_grads["CISPO"])
print(f"{'objective':10s} {'silenced tokens':>16s} {'grad norm':>10s} {'cosine to CISPO':>16s}")
for name, weight in token_weights.items():
    silenced = learning & (weight == 0)
    g = flat(param_grads[name])
    cosine = float(jnp.dot(g, reference) / (jnp.linalg.norm(g) * jnp.linalg.norm(reference)))
    print(f"{name:10s} {silenced.sum():6d} of {learning.sum():4d}   {float(jnp.linalg.norm(g)):10.4f} {cosine:16.3f}")
assert not (learning & (token_weights["CISPO"] == 0)).any(), "CISPO keeps a gradient on every token with A != 0"

# %% [markdown]
# Per-token weight divided by the token's advantage (times the number of response tokens, so an on-policy token
# with $r = 1$ sits at 1 for the token-level objectives), against its ratio. CISPO's weight follows $r$ up to
# $1 + \epsilon_{high}$ and then stays flat; the clipped objectives drop to zero on one side of the band,
# depending on the sign of $A$.

# %%
fig, axes = plt.subplots(1, 4, figsize=(14, 3.4), sharey=True)
scale = valid.sum()
for ax, (name, weight) in zip(axes, token_weights.items()):
    normalised = weight[learning] * scale / np.asarray(jnp.broadcast_to(advantages[:, None], mask.shape))[learning]
    positive = np.broadcast_to(np.asarray(advantages)[:, None] > 0, mask.shape)
    for sign, colour, label in ((True, "C2", "A > 0"), (False, "C3", "A < 0")):
        pick = (positive == sign)[learning]
        ax.scatter(ratio[learning][pick], normalised[pick], s=12, color=colour, alpha=0.7, label=label)
    ax.axvspan(0.8, 1.28 if name in ("CISPO", "DAPO") else 1.2, color="0.9", zorder=-1)
    ax.set_title(name), ax.set_xlabel("ratio r = pi / pi_old")
axes[0].set_ylabel("token weight / A (x tokens)"), axes[0].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# Which tokens are silenced, response by response (rows: the B sampled responses, grouped by prompt; columns: the
# response positions; green: the token learns, red: silenced, grey: padding or $A = 0$). GRPO's weights also
# differ in scale: it averages within each response first, so short responses weigh more per token.

# %%
colours = matplotlib.colors.ListedColormap(["tab:green", "0.85", "tab:red"])  # learns, no signal, silenced
fig, axes = plt.subplots(1, 4, figsize=(12, 4), sharey=True)
for ax, (name, weight) in zip(axes, token_weights.items()):
    picture = np.where(~learning, 1, np.where(weight == 0, 2, 0))
    ax.imshow(picture, cmap=colours, vmin=0, vmax=2, aspect="auto", interpolation="none")
    ax.set_title(f"{name}: {int((learning & (weight == 0)).sum())} silenced"), ax.set_xlabel("response position")
axes[0].set_ylabel("response (G per prompt)")
fig.tight_layout()
plt.show()

# %% [markdown]
# Things to try: raise `OFF_POLICY_UPDATES` or `UPDATE_LR` (more drift, more silenced tokens for the clipped
# objectives), pass `eps_low=0.2, unified=True` to `cispo_loss` (the paper's unified form, which silences exactly
# PPO's tokens), or set `ref_logprobs=old_logprobs` in GRPO to add its KL term.
