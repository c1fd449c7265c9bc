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
# # Lightning attention: the recurrence, the blocked form, and M1's decays
#
# Lightning attention is linear attention with a per-head exponential decay:
# $o_i = \sum_{t \le i} e^{-s_h (i-t)} (q_i \cdot k_t)\, v_t$, no softmax, no $1/\sqrt{d}$, no normaliser.
# It equals a recurrence over a $D \times D$ state, $S_i = e^{-s} S_{i-1} + k_i^\top v_i$, $o_i = q_i S_i$,
# so decoding costs the same at every context length. Training uses the blocked form: exact attention inside a
# block, the carried state across blocks. This notebook checks the three agree and looks at M1's slopes.
# budget: 30 s

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from m1jax.config import M1Config
from pallas_kernels.lightning_attention import lightning_attention, lightning_decode

jax.config.update("jax_default_matmul_precision", "highest")
B, T, H, D = 2, 77, 4, 16
keys = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(key, (B, T, H, D)) * 0.3 for key in keys)
slopes = jnp.asarray(M1Config.from_preset("tiny", num_heads=H).lightning_slopes()[0])

# %% [markdown]
# The $O(T^2)$ definition, the time recurrence ("naive") and the blocked form ("chunked", block 32 here, so 77 is
# two blocks plus a remainder):

# %%
i, t = np.arange(T)[:, None], np.arange(T)[None, :]
decay = np.where(i >= t, np.exp(-np.asarray(slopes)[:, None, None] * (i - t)), 0.0)  # (H, T, T)
direct = np.einsum("bihd,bthd,hit,bthe->bihe", q, k, decay, v)
naive = lightning_attention(q, k, v, slopes, impl="naive")
chunked, state = lightning_attention(q, k, v, slopes, impl="chunked", block_size=32, return_final_state=True)
rel = lambda a, b: float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))
print(f"naive vs definition:   {rel(naive, direct):.2e}")
print(f"chunked vs definition: {rel(chunked, direct):.2e}")
assert rel(naive, direct) < 1e-5 and rel(chunked, direct) < 1e-5

# %% [markdown]
# Decoding one more token from the final state equals running the whole sequence again:

# %%
q1, k1, v1 = (jax.random.normal(key, (B, 1, H, D)) * 0.3 for key in jax.random.split(jax.random.key(1), 3))
o_step, _ = lightning_decode(q1[:, 0], k1[:, 0], v1[:, 0], slopes, state)
full = lightning_attention(jnp.concatenate([q, q1], 1), jnp.concatenate([k, k1], 1), jnp.concatenate([v, v1], 1),
                           slopes, impl="naive")
print(f"decode step vs full recompute: {rel(o_step, np.asarray(full[:, -1])):.2e}")
assert rel(o_step, np.asarray(full[:, -1])) < 1e-5

# %% [markdown]
# ## M1's slopes
# Head h decays with $s_h = 2^{-8(h+1)/H}$, scaled by $1 - l/(L-1) + 10^{-5}$ for layer l: early layers forget
# within a few tokens, the last lightning layers remember for tens of thousands. The "memory" of a head is the
# distance at which a key's weight falls to 1/e, $1/s$.

# %%
m1 = M1Config.from_preset("minimax-m1-80k")
table = m1.lightning_slopes()  # (80, 64)
for layer in (0, 39, 78):
    memory = 1.0 / table[layer]
    print(f"layer {layer:2d}: 1/e memory from {memory.min():8.1f} to {memory.max():12.1f} tokens")

# %%
lightning = [l for l, kind in enumerate(m1.layer_types) if kind == "lightning"]
fig, ax = plt.subplots(figsize=(6, 3.5))
for head in (0, 15, 31, 63):
    ax.semilogy(lightning, 1.0 / table[lightning, head], label=f"head {head}")
ax.set_xlabel("layer"), ax.set_ylabel("1/e memory (tokens)"), ax.legend()
fig.tight_layout()
plt.show()
