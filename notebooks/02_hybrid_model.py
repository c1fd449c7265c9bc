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
# # The hybrid model: 7 lightning + 1 softmax layers, top-2 of E experts
#
# A tour of a tiny M1-style model: its parameter table next to the real M1's, one forward pass with the
# routing statistics it returns, and how packing documents into one row keeps them apart.
# budget: 60 s

# %%
import jax
import jax.numpy as jnp
import numpy as np

import m1jax
from m1jax.params import params_table

config = m1jax.M1Config.from_preset("tiny")
print(config.layer_types, "period", config.layer_period, "groups", config.num_groups)
print(params_table(config))
print()
print(params_table(m1jax.M1Config.from_preset("minimax-m1-80k")))

# %% [markdown]
# One forward pass. Besides the logits the model returns, per layer, how many (token, expert) assignments each
# expert received, the router's entropy and the Switch load-balancing loss (1.0 is perfectly balanced).

# %%
params = jax.jit(m1jax.init_params, static_argnums=0)(config, jax.random.key(0))  # jit: one compile, not op by op
model = m1jax.M1ForCausalLM(config)
ids = jax.random.randint(jax.random.key(1), (2, 40), 0, config.vocab_size)
out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, ids)
print("logits", out.logits.shape, out.logits.dtype)
for layer, kind in enumerate(config.layer_types):
    counts = np.asarray(out.routing["tokens_per_expert"][layer]).astype(int)
    print(f"layer {layer} {kind:9s} tokens per expert {counts}  "
          f"balance loss {float(out.routing['load_balancing_loss'][layer]):.3f}")

# %% [markdown]
# Packed training rows: with `segment_ids`, lightning states reset and softmax attention is masked at document
# boundaries, so two documents in one row give the same logits as two separate rows.

# %%
a, b = ids[0, :25], ids[1, :15]
packed = jnp.concatenate([a, b])[None]
segments = jnp.asarray([[1] * 25 + [2] * 15])
together = model.apply({"params": params}, packed, segment_ids=segments).logits[0]
apart = jnp.concatenate([model.apply({"params": params}, a[None]).logits[0],
                         model.apply({"params": params}, b[None]).logits[0]])
print("largest difference, packed vs separate:", float(jnp.abs(together - apart).max()))
assert jnp.allclose(together, apart, atol=1e-4)
