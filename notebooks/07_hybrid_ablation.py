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
# # The hybrid ablation, the length probe and the scaling figure (GPU results)
#
# This notebook trains nothing: it loads the results files that the GPU runs of issue 15 wrote to
# `experiments/results/` and draws them with the experiments' own plotting code.
#
# - `hybrid_ablation_gpu.json`: rounds 8-10 (2026-12-01) of `experiments/hybrid_ablation/run.py --size gpu`:
#   MQAR with hidden answers (T 64, 4 or 8 pairs), 2- and 8-layer models of width 64 with one head of 64, arms with
#   0, 1, 2, 4 or all softmax layers and lightning-only at three state sizes; each arm's seeds pooled over the calls.
#   Its `key_matching` table counts the seeds whose recall jumped past the level of naming one of the row's values.
# - `length_extrapolation_gpu.json`: the same trained models at 4x, 16x and 64x their training length.
# - `hybrid_ablation_r11-17/hybrid_ablation_gpu.json`: rounds 11-17 (2026-12-01): 2-layer models in every layer
#   order (SS, SL = softmax under lightning, LS = M1's order, LL) at T 64-256, swept over four learning rates at
#   T 64 and T 128 (round 15), LL and LS with a short convolution on the lightning layers (round 16,
#   `M1Config.lightning_short_conv=4`, labelled "conv 4"), LL with it at three state sizes (round 17), and, in
#   its `capacity` table, the recall of the members that matched keys at more pairs and longer rows than they were
#   trained on.
# - `scaling_gpu.json`: attention time against T at 1M tokens per call, and the whole-model step time per token.
#
# Read each figure with its experiment's README. Key matching emerges as a seed-dependent jump, so the count of
# seeds that reach it (first figure) is the comparison; means over seeds mix learned and stalled members.
# budget: 30 s

# %%
import json
import os
import sys

ROOT = os.path.abspath(os.path.join(os.getcwd(), ".."))
RESULTS = os.path.join(ROOT, "experiments", "results")
sys.path.insert(0, os.path.join(ROOT, "experiments", "hybrid_ablation"))
import report  # noqa: E402  (experiments/hybrid_ablation/report.py)

hybrid = json.load(open(os.path.join(RESULTS, "hybrid_ablation_gpu.json")))
lengths = json.load(open(os.path.join(RESULTS, "length_extrapolation_gpu.json")))
scaling = json.load(open(os.path.join(RESULTS, "scaling_gpu.json")))
summary = {"arms": hybrid["summary"], "lengths": lengths["summary"]}
for name, arm in summary["arms"].items():
    cells = ", ".join(f"P={p}: {100 * v['mean']:.2f}±{100 * v['std']:.2f}%"
                      for p, v in arm["accuracy_by_pairs"].items())
    print(f"{name:28s} best lr {arm['best_lr']:<7g} steps {arm['steps']:4d} params {arm['params']:,} "
          f"state {arm['state_floats']:5d} floats | {cells}")

# %% [markdown]
# ## Seeds that matched keys, per arm, depth and learning rate

# %%
for t in hybrid["key_matching"]:
    steps = [s for s in t["matched_keys_at"] if s is not None]
    print(f"{t['label']:28s} lr {t['lr']:g}: {t['matched']} of {len(t['seeds'])} seeds (at steps {steps})")
fig = report.plot_key_matching(hybrid["key_matching"], None, "MQAR, T=64, P from (4, 8): seeds that matched keys")

# %% [markdown]
# ## Recall against the number of pairs (left) and against the lightning state size (right)
# The dotted line is chance (one of the value ids). Each point: the arm's best learning rate, mean ± sd over its
# seeds (3-9): a mean of members that learned (~100%) and members that stalled at 1/P, so read it with the counts.

# %%
recipe = next(iter(summary["arms"].values()))["recipe"]
fig = report.plot_hybrid(summary, None, f"MQAR, T={recipe['seq_len']}, vocab {recipe['vocab']}, "
                                        f"P per row from {recipe['pair_choices']}")

# %% [markdown]
# ## Length extrapolation: recall at 4x, 16x and 64x the training length

# %%
fig = report.plot_lengths(summary, None, f"trained at T={recipe['seq_len']}")

# %% [markdown]
# ## Which layer retrieves (rounds 11-17)
# SL matches keys about as often as SS, both at lr 3e-3; LS and LL never did, at any of four rates. In SL the
# softmax layer alone cannot find the token after a match, so the lightning layer on top does the matching from its
# state, given the previous-token feature the softmax layer builds. With a width-4 convolution on the lightning
# layers ("conv 4") LL and LS learn too: the local feature was what they lacked.

# %%
later = json.load(open(os.path.join(RESULTS, "hybrid_ablation_r11-17", "hybrid_ablation_gpu.json")))
for t in later["key_matching"]:
    print(f"{t['label']:60s} {t['matched']:2d} of {len(t['seeds']):2d} seeds")
fig = report.plot_key_matching(later["key_matching"], None, "MQAR, rounds 11-17: seeds that matched keys")

# %% [markdown]
# ## How many pairs the learned models hold, past their training P and length
# Means over the members that matched keys (and whose probe asked for that P). Dotted: the lightning head dim D = 64.

# %%
for label, entry in report.probed_past_training(later["capacity"]).items():
    print(label, {length: {p: round(100 * v) for p, v in values.items()} for length, values in entry["recall"].items()})
fig = report.plot_capacity(later["capacity"], None, "recall of the members that matched keys")

# %% [markdown]
# ## The scaling figure
# Left and middle: one attention op at 1,048,576 tokens per call (B = 2^20 / T rows), H=8, D=128, bf16, against T.
# Right: one forward+backward step of an 8-layer, width-1024 model at 65,536 tokens per step, per token.

# %%
sys.path.insert(0, os.path.join(ROOT, "experiments", "scaling"))
import importlib.util  # noqa: E402

spec = importlib.util.spec_from_file_location("scaling_run", os.path.join(ROOT, "experiments", "scaling", "run.py"))
scaling_run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scaling_run)
print(json.dumps(scaling["summary"]))
fig = scaling_run.plot(scaling["rows"], scaling["summary"], None)
