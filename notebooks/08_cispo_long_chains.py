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
# # CISPO vs DAPO vs GRPO on long reasoning chains
#
# MiniMax-M1 credits CISPO's gain to the gradient of rare, low-probability "fork" tokens: over 16 off-policy
# updates their importance ratio r = pi_theta / pi_old leaves PPO's clip band, and PPO-style clipping (GRPO, DAPO)
# then drops their gradient, while CISPO keeps it and clips only the weight. This notebook reads the committed
# results of `experiments/cispo_long_chains/run.py` (one H200) and shows the curves, the summary table, where the
# tokens outside the band sit (role, old-policy probability) and the most-clipped tokens with their text. Three
# rounds; set ROUND:
# - 1 and 2: worked long additions of 5-12 digits, whose fork is the carry decision after each "x+y"; round 1 starts
#   at 40% sampled accuracy with 12 generation batches, round 2 at 22% with 50 batches and a sweep down to 1e-5;
# - "countdown" (the default): countdown search traces (`--task countdown`), whose forks are the first
#   byte of each attempted step (`step_fork`: which numbers to combine) and the back-out `<` (`back_fork`); round 3
#   of it: a 3.8M model started at 31% sampled accuracy, 110 generation batches, 3 paired seeds, the rates the sweep
#   (1e-5, 3e-5, 1e-4) chose (3e-5 for all three), in which CISPO collapsed on every seed;
# - "countdown-cispo-1e-5": the diagnostic beside it, CISPO at 1e-5 against the same DAPO and GRPO runs (seeds 0
#   and 1, 100 batches); "countdown-1e-5": round 4, all three at 1e-5 (3 paired seeds, 96 batches; DAPO's token
#   statistics from seed 2 only); "countdown-2": round 2 (24 batches; round 1's tables are in the experiment's README).
# budget: 30 s

# %%
import json
import os

import matplotlib.pyplot as plt
import numpy as np

ROOT = os.path.abspath(os.path.join(os.getcwd(), "..")) if os.path.basename(os.getcwd()) == "notebooks" else os.getcwd()
RESULTS = os.path.join(ROOT, "experiments", "results")
ROUNDS = {1: "cispo_long_chains.json", 2: "cispo_long_chains_gpu2.json", "countdown": "cispo_countdown.json",
          "countdown-cispo-1e-5": "cispo_countdown_cispo-lr1e-5.json", "countdown-2": "cispo_countdown_round2.json",
          "countdown-1e-5": "cispo_countdown_lr1e-5.json"}
ROUND = "countdown"  # round 3; see ROUNDS for the others (round 4: "countdown-1e-5")
with open(os.path.join(RESULTS, ROUNDS[ROUND])) as f:
    result = json.load(f)  # result["setup"] holds the same as the round's *_setup.json
summary = result["summary"]
algos = [a for a, row in summary["algorithms"].items() if row["per_seed"]]
steps_run = min(len(c["reward_mean"]) for c in result["curves"].values())
swept = sorted({float(lr) for rewards in result["setup"]["sweep"]["second_half_reward"].values() for lr in rewards})
print("round", ROUND, "| seeds", result["seeds"], "| learning rates", result["learning_rates"], "| swept", swept,
      "| generation batches per run", steps_run, "| device", result["setup"]["devices"])
print("pretrained:", {k: result["setup"]["pretrain"]["chosen"][k] for k in ("step", "greedy_accuracy",
                                                                         "sampled_accuracy", "response_bytes")})
print("pretraining evaluations (step: greedy / sampled accuracy, response bytes):")
for snap in result["setup"]["pretrain"]["snapshots"]:
    print(f"  {snap['step']:6d}: {100 * snap['greedy_accuracy']:5.1f}% / {100 * snap['sampled_accuracy']:5.1f}%, "
          f"{snap['response_bytes']:.0f} bytes")

# %% [markdown]
# ## Curves (mean over seeds; band: min to max)

# %%
colors = {"cispo": "tab:red", "dapo": "tab:blue", "grpo": "tab:green"}
panels = [("reward_mean", "training reward (5-step mean)"), ("eval_accuracy", "held-out greedy accuracy"),
          ("clip_high_frac", "tokens with r > 1 + own eps_high (1.28; GRPO 1.2)"),
          ("dropped_frac", "gradient dropped by clipping"),
          ("entropy_rollout", "entropy (nats/token)"), ("grad_norm", "grad norm")]


def smoothed(values, n=result["smooth"]):
    values = np.asarray(values, np.float64)
    return np.array([values[max(0, i - n + 1):i + 1].mean() for i in range(len(values))])


fig, axes = plt.subplots(2, 3, figsize=(14, 7))
for ax, (key, title) in zip(axes.flat, panels):
    for algo in algos:
        series = [c[key] for name, c in result["curves"].items() if name.startswith(algo + "-")]
        if key == "eval_accuracy":
            steps = [i + 1 for i, v in enumerate(series[0]) if v is not None]
            values = np.array([[v for v in s if v is not None] for s in series], np.float64)
        else:
            length = min(map(len, series))
            values = np.array([smoothed(s[:length]) if key == "reward_mean" else s[:length] for s in series],
                              np.float64)
            steps = np.arange(1, length + 1)
        ax.plot(steps, values.mean(0), color=colors[algo], label=algo)
        ax.fill_between(steps, values.min(0), values.max(0), color=colors[algo], alpha=0.2)
    ax.set(title=title, xlabel="generation batch")
axes.flat[0].legend()
fig.tight_layout()

# %% [markdown]
# ## Summary (mean ± std over seeds)
# "r>1.28" is pooled over seeds and steps against the one reference band (as in the results .md); the curve above
# counts each algorithm's own band, which for GRPO (eps 0.2) is r > 1.2.

# %%
def pm(stat, scale=1.0, digits=3):
    return "-" if stat["mean"] is None else f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


print(f"{'algo':6} {'mean reward':>16} {'final reward':>16} {'held-out acc %':>14} {'r>1.28 %':>14} "
      f"{'dropped %':>14} {'steps to DAPO final':>22}")
for algo in algos:
    row = summary["algorithms"][algo]
    steps = [s["steps_to_dapo_final"] for s in row["per_seed"]]
    counts = row["tokens"]["counts"]
    print(f"{algo:6} {pm(row['mean_reward']):>16} {pm(row['final_reward']):>16} {pm(row['final_eval'], 100, 1):>14} "
          f"{100 * counts['high'] / max(counts['tokens'], 1):14.2f} {pm(row['dropped_frac'], 100, 2):>14} "
          f"{str(steps):>22}")
for name, diff in summary["paired"].items():
    print(name, "paired: mean reward", pm(diff["mean_reward"]), "| final reward", pm(diff["final_reward"]),
          "| held-out accuracy", pm(diff["final_eval"], 100, 1), "points")

# %% [markdown]
# ## Which tokens leave the band?
# Share of each role's tokens with r > 1.28 (summed over seeds and steps), and the old-policy probability of all
# tokens against those outside the band: fork tokens would be rare (low pi_old) and concentrated at the fork roles
# (`carry_decision` for the long additions, `step_fork` and `back_fork` for countdown). The second table gives
# each role's share of all the tokens outside the band.

# %%
roles = list(next(summary["algorithms"][a]["tokens"] for a in algos)["by_role"])
print(f"{'algo':6} " + " ".join(f"{r:>15}" for r in roles))
for algo in algos:
    tok = summary["algorithms"][algo]["tokens"]
    print(f"{algo:6} " + " ".join(f"{100 * v[1] / max(v[0], 1):14.2f}%" for v in (tok["by_role"][r] for r in roles)))
print("share of all tokens with r > 1.28:")
for algo in algos:
    by_role = summary["algorithms"][algo]["tokens"]["by_role"]
    high = sum(v[1] for v in by_role.values())
    print(f"{algo:6} " + " ".join(f"{100 * by_role[r][1] / max(high, 1):14.1f}%" for r in roles))

bins = ["0-.01", ".01-.1", ".1-.3", ".3-.5", ".5-.7", ".7-.9", ".9-.99", ".99-1"]
fig, axes = plt.subplots(1, len(algos), figsize=(4.5 * len(algos), 3.2), sharey=True)
for ax, algo in zip(np.atleast_1d(axes), algos):
    hist = summary["algorithms"][algo]["tokens"]["prob_hist"]
    for name, color in (("tokens", "gray"), ("high", "tab:red"), ("dropped", "black")):
        counts = np.asarray(hist[name], np.float64)
        ax.plot(bins, counts / max(counts.sum(), 1), marker="o", color=color, label=name)
    ax.set(title=algo, xlabel="pi_old of the token")
    ax.tick_params(axis="x", rotation=45)
np.atleast_1d(axes)[0].legend()
fig.tight_layout()

# %% [markdown]
# ## The most-clipped tokens (largest ratios), with the text before them

# %%
for algo in algos:
    print(f"--- {algo}")
    for t in summary["algorithms"][algo]["tokens"]["top_high"][:10]:
        print(f"  ...{t['context']:>16} [{t['token']}]  role {t['role']:<14} pi_old {t['old_prob']:.4f}  "
              f"r {t['ratio']:.2f}  A {t['advantage']:+.2f}")
by_byte = summary["algorithms"][algos[0]]["tokens"]["by_byte"]
ranked = sorted(by_byte.items(), key=lambda kv: -kv[1][1])[:8]
print("bytes most often outside the band (", algos[0], "):",
      ", ".join(f"{b!r}: {v[1]} of {v[0]}" for b, v in ranked))

# %% [markdown]
# ## Training-inference mismatch on the pretrained model

# %%
for row in result["setup"]["mismatch"]:
    print(f"{row['engine']:34} correlation {row['mismatch_corr']:.6f}  largest gap {row['mismatch_max_gap']:.2e}  "
          f"tokens {row['tokens']}")
