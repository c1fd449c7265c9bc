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
# # A million-token prompt on one GPU: chunked prefill, a state that does not grow, and stopping half-way
#
# M1 reads 1M-token prompts because 7 of every 8 layers are lightning attention: each keeps a (H, D, D) float32
# state $S \leftarrow e^{-s m} S + (K \odot \text{decay})^\top V$ per block of m tokens, the same size after 10
# tokens or 10 million. Only the softmax layers (1 in 8) keep keys and values for every token. The engine
# (`m1jax/inference/engine.py`) therefore prefills a long prompt chunk by chunk, carrying the lightning states and
# appending to the softmax cache, and the whole inference state can be saved part-way and resumed later
# (`m1jax/inference/state_io.py`), giving the same tokens as an uninterrupted run.
#
# `PROMPT_TOKENS` below sets the length: 1,048,576 with the 1B research model when a GPU is present (about a
# minute on an H200, see the README), a few thousand tokens of the tiny model on a CPU (as CI runs it). The model
# is untrained: this notebook is about the mechanics and the memory, not the text.
# budget: 60 s

# %%
import tempfile
import time
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np

import m1jax
from m1jax.inference import (cache_bytes, continue_generation, generate, load_inference_state, make_request, prefill,
                             save_inference_state, start)

ON_GPU = jax.default_backend() == "gpu"
PRESET = "research-1b" if ON_GPU else "tiny"
PROMPT_TOKENS = 1_048_576 if ON_GPU else 3072  # a multiple of CHUNK: every chunk has one shape
CHUNK = 65_536 if ON_GPU else 512
NEW_TOKENS = 16
STOP_AFTER_CHUNKS = PROMPT_TOKENS // CHUNK // 2  # where the interrupted run saves its state

config = m1jax.M1Config.from_preset(PRESET)
model = m1jax.M1ForCausalLM(config)
params = jax.jit(m1jax.init_params, static_argnums=0)(config, jax.random.key(0))
prompt = np.random.default_rng(0).integers(1, config.vocab_size, PROMPT_TOKENS).tolist()
print(f"{PRESET} on {jax.default_backend()}: {config.layer_types.count('lightning')} lightning + "
      f"{config.layer_types.count('softmax')} softmax layers; prompt of {PROMPT_TOKENS:,} tokens, chunks of {CHUNK:,}")

# %% [markdown]
# ## Memory: the lightning state against the softmax cache
# `cache_bytes(config, batch, max_len)` counts the cache from its shapes, without allocating. The lightning part is
# flat; the softmax part grows linearly with the context. For the real M1 at 1M tokens the 70 lightning states
# weigh 280 MiB in all; a softmax-only M1 would hold 8 times the KV cache of its 10 softmax layers.

# %%
def cache_split(cfg, length):
    """(lightning state bytes, softmax kv bytes) of one sequence of `length` tokens."""
    lightning_only = cfg.replace(layer_types=("lightning",) * cfg.num_layers)
    state = cache_bytes(lightning_only, 1, length) * cfg.layer_types.count("lightning") / cfg.num_layers
    return state, cache_bytes(cfg, 1, length) - state


lengths = np.geomspace(4096, 1 << 20, 9).astype(int)
fig, ax = plt.subplots(figsize=(6.5, 3.8))
for name, style in (("research-1b", "-"), ("minimax-m1-80k", "--")):
    cfg = m1jax.M1Config.from_preset(name)
    split = np.array([cache_split(cfg, int(n)) for n in lengths]) / 2**30
    ax.loglog(lengths, split[:, 0], style, color="C0", label=f"{name}: lightning states")
    ax.loglog(lengths, split[:, 1], style, color="C1", label=f"{name}: softmax keys + values")
    print(f"{name:15s} at 1M tokens: lightning states {split[-1, 0]:7.3f} GiB, softmax cache {split[-1, 1]:7.2f} GiB")
all_softmax = m1jax.M1Config.from_preset("minimax-m1-80k").replace(layer_types=("softmax",) * 80)
ax.loglog(lengths, [cache_bytes(all_softmax, 1, int(n)) / 2**30 for n in lengths], ":", color="C3",
          label="M1 with 80 softmax layers (hypothetical)")
print(f"M1 with 80 softmax layers at 1M tokens: {cache_bytes(all_softmax, 1, 1 << 20) / 2**30:.0f} GiB")
ax.set_xlabel("context (tokens)"), ax.set_ylabel("GiB per sequence"), ax.legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Chunked prefill
# `start` pads the prompt and allocates the cache; `prefill(..., max_chunks=1)` runs one chunk and returns the
# updated state (the state is donated: keep only the returned one). The time per chunk is nearly flat: the
# lightning layers cost the same for every chunk, and only the softmax layers' attention grows with the position.

# %%
STOP_IDS = (config.vocab_size - 1,)  # a row stops after drawing one of these
request = make_request(config, PROMPT_TOKENS, max_new_tokens=NEW_TOKENS, temperature=1.0, seed=7, chunk_size=CHUNK,
                       stop_ids=STOP_IDS)
state = start(config, [prompt], request)
seconds = []
while int(state.cache.index) < PROMPT_TOKENS:
    begin = time.perf_counter()
    state = prefill(model, params, state, request, max_chunks=1)
    seconds.append(time.perf_counter() - begin)
print(f"{len(seconds)} chunks: first {seconds[0]:.2f} s (compilation), then median {np.median(seconds[1:]):.3f} s "
      f"per chunk; {(PROMPT_TOKENS - CHUNK) / sum(seconds[1:]):,.0f} tokens/s after the first")
lightning = [x["state"] for x in state.cache.layers if "state" in x]
largest = max(float(abs(s).max()) for s in lightning)
print(f"lightning states: {len(lightning)} x {lightning[0].shape} float32 whatever the length, max |S| {largest:.3g}")

fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(np.arange(2, len(seconds) + 1) * CHUNK, seconds[1:], "o-")
ax.set_xlabel("prompt position at the end of the chunk"), ax.set_ylabel("seconds per chunk"), ax.set_ylim(bottom=0)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Stop, save, resume: the same tokens
# An uninterrupted `generate` is the reference. The second run prefills `STOP_AFTER_CHUNKS` chunks, writes the whole
# inference state (cache, prompt, sampling key, routing counts) with orbax, and a fresh `load_inference_state`
# continues it: the rest of the prefill, then sampling. Sampling draws from `fold_in(key(seed), step)`, so the
# resumed run draws exactly the same tokens.

# %%
reference = generate(model, params, [prompt], max_new_tokens=NEW_TOKENS, temperature=1.0, seed=7, chunk_size=CHUNK,
                     stop_ids=STOP_IDS)

state = prefill(model, params, start(config, [prompt], request), request, max_chunks=STOP_AFTER_CHUNKS)
with tempfile.TemporaryDirectory() as scratch:
    saved = save_inference_state(Path(scratch) / "half_prefilled", state, request, config)
    size = sum(f.stat().st_size for f in Path(saved).rglob("*") if f.is_file())
    del state
    restored, restored_request = load_inference_state(saved, config)
    print(f"saved after {int(restored.cache.index):,} of {PROMPT_TOKENS:,} prompt tokens: {size / 2**20:.1f} MiB "
          "on disk")
    resumed = continue_generation(model, params, restored, restored_request)

print("reference:", reference.completions[0])
print("resumed:  ", resumed.completions[0])
assert resumed.completions == reference.completions, "the resumed generation must draw the same tokens"
print(f"same {len(resumed.completions[0])} tokens; prefill {reference.usage.prefill_tokens_per_second:,.0f} tokens/s, "
      f"decode {reference.usage.decode_tokens_per_second:,.0f} tokens/s (uninterrupted run)")
