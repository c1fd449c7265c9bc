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
# # Planning MiniMax-M1 on a pod: memory per device, and FLOPs against generation length
#
# The full model (456B parameters, 45.9B active per token) never has to exist on this machine to be planned:
# `m1jax.plan` builds its parameters as abstract shapes, shards them on a `jax.sharding.AbstractMesh` with the same
# rules training uses (`m1jax/sharding.py`), and adds up bytes per device. The command line is the same function:
#
#     m1jax plan --preset minimax-m1-80k --mesh fsdp=16,expert=8 --batch-size 128 --seq-len 8192
#
# The second half redraws the paper's Figure 1 (right) from the analytic counts of `m1jax/flops.py`: M1's 70
# lightning layers cost the same per generated token at any context, only its 10 softmax layers grow, while every
# one of DeepSeek-R1's 61 layers attends over the whole context.
# budget: 40 s

# %%
import runpy
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from m1jax.config import LIGHTNING, M1Config, RunPolicy
from m1jax.flops import decode_flops_per_token, lightning_layer_flops, moe_flops, softmax_layer_flops
from m1jax.params import count_params
from m1jax.plan import DEVICE_MEMORY_GIB, GIB, plan, plan_table

m1 = M1Config.from_preset("minimax-m1-80k")
counts = count_params(m1)
print(f"MiniMax-M1: {counts['total']:,} parameters, {counts['active']:,} active per token")

# %% [markdown]
# ## Training meshes
# Each mesh names how many devices split each axis: `fsdp` shards parameters and the batch, `expert` places whole
# experts (M1 has 32), `tensor` splits heads and expert widths, `data` replicates. The batch is 128 sequences of
# 8192 tokens with full rematerialisation; change the meshes, the batch or `remat` and rerun. The batch axes
# (`data`, `fsdp`, `expert`) must divide the batch: `plan` says so, naming the axes, when they do not.

# %%
BATCH, SEQ_LEN = 128, 8192
TRAINING_MESHES = {
    "fsdp=16, expert=8 (128)": {"fsdp": 16, "expert": 8},
    "fsdp=8, expert=8, tensor=4 (256)": {"fsdp": 8, "expert": 8, "tensor": 4},
    "fsdp=16, expert=8, tensor=4 (512)": {"fsdp": 16, "expert": 8, "tensor": 4},
}
plans = {}
for name, axes in TRAINING_MESHES.items():
    plans[name] = plan(m1, axes, batch_size=BATCH, seq_len=SEQ_LEN, policy=RunPolicy(remat="full"))
print(plan_table(m1, TRAINING_MESHES["fsdp=16, expert=8 (128)"], batch_size=BATCH, seq_len=SEQ_LEN))

# %% [markdown]
# ## Serving a million-token context
# For inference the weights are bf16 and the only state is the cache: each of the 70 lightning layers keeps a
# (H, D, D) float32 state whatever the length, each of the 10 softmax layers keeps keys and values for every token.
# The `expert` axis also splits the batch, so 8 sequences of 1M tokens on 64 devices: one sequence per expert group.

# %%
INFERENCE_MESH, SEQUENCES, CONTEXT = {"expert": 8, "tensor": 8}, 8, 1_048_576
print(plan_table(m1, INFERENCE_MESH, batch_size=SEQUENCES, seq_len=CONTEXT, training=False))
plans["inference expert=8, tensor=8 (64), 8 x 1M"] = plan(m1, INFERENCE_MESH, batch_size=SEQUENCES, seq_len=CONTEXT,
                                                           training=False)

# %%
fig, ax = plt.subplots(figsize=(9, 3.8))
parts = sorted({k for p in plans.values() for k in p if k not in ("devices", "total")})
bottom = np.zeros(len(plans))
for i, part in enumerate(parts):
    values = np.array([p.get(part, 0.0) / GIB for p in plans.values()])
    ax.barh(range(len(plans)), values, left=bottom, label=part, color=f"C{i}")
    bottom += values
for kind, gib in DEVICE_MEMORY_GIB.items():
    ax.axvline(0.9 * gib, ls="--", color="k" if kind == "H200" else "0.5", lw=1)
    ax.text(0.9 * gib, len(plans) - 0.4, f" 90% of {kind}", fontsize=8)
ax.set_yticks(range(len(plans)), list(plans)), ax.invert_yaxis()
ax.set_xlabel("GiB per device"), ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
fig.tight_layout()
plt.show()

# %% [markdown]
# ## FLOPs per generated token: M1 against DeepSeek-R1
# R1's count lives in `experiments/flops_vs_generation/run.py` (from its config.json: MLA attention over the whole
# context in all 61 layers); M1's is `m1jax.flops.decode_flops_per_token`.

# %%
experiment = runpy.run_path(str(Path("..") / "experiments" / "flops_vs_generation" / "run.py"))
r1_flops_per_token, cumulative = experiment["r1_flops_per_token"], experiment["cumulative"]
contexts = np.unique(np.geomspace(1024, 131_072, 60).astype(int))
m1_token = np.array([decode_flops_per_token(m1, int(t)) for t in contexts])
r1_token = np.array([r1_flops_per_token(int(t)) for t in contexts])
m1_total = np.array([cumulative(lambda t: decode_flops_per_token(m1, t), int(n), samples=64) for n in contexts])
r1_total = np.array([cumulative(r1_flops_per_token, int(n), samples=64) for n in contexts])
for n in (65_536, 100_000):
    print(f"{n:,} generated tokens: M1/R1 {decode_flops_per_token(m1, n) / r1_flops_per_token(n):.2f} for that "
          f"token, {cumulative(lambda t: decode_flops_per_token(m1, t), n) / cumulative(r1_flops_per_token, n):.2f} "
          "cumulatively")

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
left.plot(contexts / 1000, m1_total / 1e15, label="MiniMax-M1")
left.plot(contexts / 1000, r1_total / 1e15, label="DeepSeek-R1")
left.set_xlabel("generation length (K tokens)"), left.set_ylabel("cumulative FLOPs (PFLOP)"), left.legend()
right.plot(contexts / 1000, m1_token / r1_token, label="cost of the t-th token")
right.plot(contexts / 1000, m1_total / r1_total, label="cumulative")
right.axhline(1.0, color="k", lw=0.8)
for n, claim in ((64, 0.5), (100, 0.25)):
    right.plot([n], [claim], "kx")
    right.annotate(f"paper: {claim:.0%} at {n}K", (n, claim), textcoords="offset points", xytext=(5, 5), fontsize=8)
right.set_xlabel("generation length (K tokens)"), right.set_ylabel("M1 / R1 FLOPs"), right.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Where M1's FLOPs go as the context grows
# Per generated token: the lightning layers' attention (constant), the softmax layers' attention (linear in the
# context), the MoE (constant) and the lm_head.

# %%
kinds = m1.layer_types
lightning_layers, softmax_layers = kinds.count(LIGHTNING), len(kinds) - kinds.count(LIGHTNING)
rows = []
for context in (4096, 65_536, 1_048_576):
    softmax = softmax_layers * softmax_layer_flops(m1, 1, context)
    total = decode_flops_per_token(m1, context)
    moe = len(kinds) * moe_flops(m1, 1)
    rows.append((context, softmax / total, moe / total, total))
    print(f"context {context:>9,}: {total / 1e9:8.1f} GFLOP per token; softmax attention {softmax / total:5.1%}, "
          f"MoE {moe / total:5.1%}, lightning layers and lm_head the rest")
print(f"(one lightning layer's prefill of a 1M prompt: {lightning_layer_flops(m1, 1_048_576) / 1e15:.1f} PFLOP, "
      "linear in the length)")
