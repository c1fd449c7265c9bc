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
# # Routing: tokens per expert, load balance over training, and what `expert_threshold` trades
#
# Every M1 layer sends each token to 2 of 32 experts. The router is a float32 softmax over all experts,
# $p = \mathrm{softmax}(x W_g)$; the top $k$ are kept and their weights renormalised to sum to 1. Nothing stops the
# router from sending most tokens to a few experts, so training adds the Switch load-balancing loss
# $\mathcal{L}_{aux} = E \sum_e f_e P_e$ ($f_e$ the fraction of assignments expert $e$ got, $P_e$ its mean router
# probability; 1.0 when perfectly even) with a small coefficient (0.001 in M1).
#
# This notebook trains a tiny hybrid twice on byte-level arithmetic, with and without that loss, watches the expert
# loads move, then turns the inference knob `expert_threshold`: a token's second expert is skipped when its
# renormalised weight is below the threshold, which saves expert work at some cost in quality.
#
# Change the knobs in the next cell (more experts, top-1, a larger coefficient, more steps) and rerun.
# budget: 60 s

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import m1jax
from m1jax.train.data import make_data

NUM_EXPERTS, TOP_K = 8, 2
STEPS, BATCH, SEQ_LEN = 60, 8, 64
AUX_COEFS = (0.0, 0.05)  # the two runs: no balancing loss, and a strong one (M1 used 0.001 at full scale)
THRESHOLDS = (0.0, 0.3, 0.4, 0.5)  # 0.5 skips every second choice: top-1 routing with top-2 training

LAYERS = ("lightning", "softmax")  # one of each keeps CI fast; ("lightning",) * 7 + ("softmax",) is M1's group
config = m1jax.M1Config.from_preset("tiny", num_experts=NUM_EXPERTS, experts_per_token=TOP_K, vocab_size=260,
                                    layer_types=LAYERS)
model = m1jax.M1ForCausalLM(config)
data = make_data("arith", batch_size=BATCH, seq_len=SEQ_LEN, seed=0, vocab_size=config.vocab_size, digits=2)
held_out = make_data("arith", batch_size=64, seq_len=SEQ_LEN, seed=1, vocab_size=config.vocab_size, digits=2)
print(config.layer_types, f"{NUM_EXPERTS} experts, top-{TOP_K}")

# %% [markdown]
# ## Training with and without the balancing loss
# One jitted step: cross-entropy on the graded tokens (answers) plus `aux_coef` times the mean load-balancing loss.
# The coefficient is an argument, so both runs share one compiled step. Each step records every layer's
# tokens per expert.

# %%
optimizer = optax.adamw(3e-3, b1=0.9, b2=0.95, weight_decay=0.0)


def objective(params, batch, aux_coef):
    out = model.apply({"params": params}, batch["inputs"], segment_ids=batch["segment_ids"])
    logp = jax.nn.log_softmax(out.logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    ce = jnp.sum(nll * batch["loss_mask"]) / jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    return ce + aux_coef * out.aux_loss, (ce, out.routing["tokens_per_expert"])


@jax.jit
def train_step(params, opt_state, batch, aux_coef):
    (_, (ce, tokens_per_expert)), grads = jax.value_and_grad(objective, has_aux=True)(params, batch, aux_coef)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, ce, tokens_per_expert


init = jax.jit(m1jax.init_params, static_argnums=0)(config, jax.random.key(0))
runs = {}
for aux_coef in AUX_COEFS:
    begin = time.perf_counter()
    params, opt_state = init, optimizer.init(init)
    losses, loads = [], []
    for step in range(STEPS):
        batch = {k: jnp.asarray(v) for k, v in data.batch(step).items()}
        params, opt_state, ce, counts = train_step(params, opt_state, batch, aux_coef)
        losses.append(float(ce))
        loads.append(np.asarray(counts))
    runs[aux_coef] = {"params": params, "loss": np.array(losses), "tokens_per_expert": np.stack(loads)}  # (S, L, E)
    print(f"aux_coef {aux_coef}: loss {losses[0]:.2f} -> {np.mean(losses[-10:]):.2f} "
          f"in {time.perf_counter() - begin:.1f} s")

# %% [markdown]
# The imbalance of a layer is its busiest expert's count over the mean count (1.0 is perfect balance; with top-k
# routing an expert can hold at most one of each token's k choices, so the worst case is $E/k$, 4 here: all
# assignments on k experts). Left: imbalance of each layer over training; right: the final share of assignments per
# expert of the layer that ends the most imbalanced without the loss. Without it, routing tends to collapse onto a
# few experts within tens of steps (nothing pushes back once one expert is a little better trained); with it the
# loads stay nearer even, at a small cost in the task loss.

# %%
def imbalance(tokens_per_expert):
    """(..., E) counts -> (...) max count over mean count."""
    return tokens_per_expert.max(-1) / np.maximum(tokens_per_expert.mean(-1), 1e-9)


fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
worst = int(np.argmax(imbalance(runs[AUX_COEFS[0]]["tokens_per_expert"][-10:].mean(0))))
for aux_coef, style in zip(AUX_COEFS, ("-", "--")):
    curves = imbalance(runs[aux_coef]["tokens_per_expert"])  # (S, L)
    for layer in range(config.num_layers):
        left.plot(curves[:, layer], style, color=f"C{layer}", label=f"layer {layer}, aux {aux_coef}")
left.set_xlabel("step"), left.set_ylabel("max / mean tokens per expert"), left.legend(fontsize=6, ncol=2)
width = 0.4
for i, aux_coef in enumerate(AUX_COEFS):
    final = runs[aux_coef]["tokens_per_expert"][-10:, worst].mean(0)
    right.bar(np.arange(NUM_EXPERTS) + (i - 0.5) * width, final / final.sum(), width, label=f"aux {aux_coef}")
right.axhline(1 / NUM_EXPERTS, color="k", lw=0.8, label="even")
right.set_xlabel(f"expert (layer {worst})"), right.set_ylabel("share of assignments"), right.legend(fontsize=8)
fig.tight_layout()
plt.show()
for aux_coef in AUX_COEFS:
    final = imbalance(runs[aux_coef]["tokens_per_expert"][-10:].mean(0))
    print(f"aux_coef {aux_coef}: final imbalance per layer {np.round(final, 2)}, "
          f"final loss {runs[aux_coef]['loss'][-10:].mean():.3f}")

# %% [markdown]
# ## `expert_threshold`: fewer experts per token, at what cost
# The threshold is run-time policy (it is not part of the checkpoint or the config):
# `model.clone(policy=model.policy.replace(expert_threshold=t))` gives the same model with the rule applied in every
# MoE layer. For each threshold: the held-out answer loss and token accuracy, and the expert calls per token actually
# computed (`routing["expert_calls"]`).

# %%
params = runs[AUX_COEFS[-1]]["params"]
batch = {k: jnp.asarray(v) for k, v in held_out.batch(0).items()}
real_tokens = float(jnp.sum(batch["segment_ids"]))
rows = []
for threshold in THRESHOLDS:
    variant = model.clone(policy=model.policy.replace(expert_threshold=threshold))
    out = jax.jit(lambda p, b: variant.apply({"params": p}, b["inputs"], segment_ids=b["segment_ids"]))(params, batch)
    logp = jax.nn.log_softmax(out.logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"]
    loss = float(jnp.sum(nll * mask) / jnp.sum(mask))
    accuracy = float(jnp.sum((jnp.argmax(out.logits, -1) == batch["targets"]) * mask) / jnp.sum(mask))
    calls = float(jnp.sum(out.routing["expert_calls"])) / (real_tokens * config.num_layers)
    rows.append((threshold, calls, loss, accuracy))
    print(f"threshold {threshold:4.2f}: {calls:.2f} experts per token, answer loss {loss:.3f}, "
          f"token accuracy {accuracy:.3f}")
assert abs(rows[0][1] - TOP_K) < 1e-6, "threshold 0 must compute every one of the top-k choices"

# %%
rows = np.array(rows)
fig, ax = plt.subplots(figsize=(5.5, 3.6))
ax.plot(rows[:, 1], rows[:, 2], "o-")
for threshold, calls, loss, _ in rows:
    ax.annotate(f"t={threshold:g}", (calls, loss), textcoords="offset points", xytext=(4, 4), fontsize=8)
ax.set_xlabel("expert calls per token"), ax.set_ylabel("held-out answer loss")
ax.set_title("expert_threshold: compute against quality")
fig.tight_layout()
plt.show()

# %% [markdown]
# Reading the numbers: a threshold of 0 is the exact model (k experts per token). Raising it skips the second
# choice on the tokens whose router was confident, so compute falls to between k and 1 experts per token; how much
# loss that costs depends on how often the second expert carried real weight. With only 60 steps on a
# tiny model the numbers are small and noisy; at full scale the same sweep is one flag
# (`m1jax generate --expert-threshold`).
