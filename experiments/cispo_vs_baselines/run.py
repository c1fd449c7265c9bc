"""CISPO vs DAPO vs GRPO at small scale, and the training-inference probability mismatch.

MiniMax-M1 (section 3.1) reports that on zero-RL from Qwen2.5-32B, CISPO matched DAPO's AIME 2024 score with half
the training steps, and (section 3.3) that a float32 lm_head raised the correlation of training and inference
token probabilities from 0.987 to 0.997. This script asks the same questions of a small model:

    python experiments/cispo_vs_baselines/run.py                # CPU size: tiny model, 1-digit arithmetic
    python experiments/cispo_vs_baselines/run.py --size gpu     # a larger model and task, for one GPU

1. Pretrain on the built-in arith task (teacher-forced next-token loss) to a modest accuracy.
2. From that checkpoint, RL with CISPO, DAPO and GRPO under equal budgets: the same generation batches (prompts x
   group size), the same number of updates per batch, the same learning rate and optimizer; seeds 0..S-1 pick the
   prompt stream and the draws, paired across algorithms (seed s gives every algorithm the same prompts).
3. Report, per algorithm, mean and spread over seeds of: steps until the smoothed training reward first reaches a
   fixed target, and DAPO's final level (the paper's comparison), final training reward, and held-out greedy
   accuracy; the reward curves; and the mismatch of a bfloat16 engine against the float32 trainer with a bf16 and a
   float32 lm_head.

Results: experiments/results/cispo_vs_baselines.{json,md,png}. Runs land under --out (resumable: rerunning skips
finished work).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from m1jax.checkpoint.state import load_training_output  # noqa: E402
from m1jax.model import M1ForCausalLM  # noqa: E402
from m1jax.rl.rollout import RolloutConfig, collect_rollout, get_rl_task  # noqa: E402
from m1jax.rl.trainer import LossConfig, RLConfig, train_rl  # noqa: E402
from m1jax.train.loop import TrainConfig, train  # noqa: E402
from m1jax.train.optimizer import OptimizerConfig  # noqa: E402

# name -> (loss, dynamic sampling): the three algorithms as published, and CISPO with DAPO's dynamic sampling, which
# separates CISPO's clipping rule from DAPO's batch filter (token-level means over the informative groups only)
VARIANTS = {"cispo": ("cispo", False), "dapo": ("dapo", True), "grpo": ("grpo", False),
            "cispo_ds": ("cispo", True)}
ALGOS = tuple(VARIANTS)
PAIRS = (("cispo", "dapo"), ("cispo", "grpo"), ("cispo_ds", "dapo"))
RESULTS = os.path.join(ROOT, "experiments", "results")
SMOOTH = 5  # steps in the trailing mean of the training reward


@dataclasses.dataclass(frozen=True)
class Size:
    preset: str
    digits: int
    ops: str
    pretrain_steps: int
    pretrain_batch: int
    seq_len: int
    pretrain_lr: float
    rl_steps: int
    prompts: int
    group: int
    updates: int
    max_new_tokens: int
    lr: float
    target: float  # training reward whose first crossing is reported
    eval_prompts: int
    eval_every: int


SIZES = {
    # ~15 minutes on 2 CPU cores: 300 distinct problems, a 64-wide 4-layer model stopped at ~30% accuracy
    "cpu": Size(preset="tiny", digits=1, ops="+-*", pretrain_steps=160, pretrain_batch=32, seq_len=64,
                pretrain_lr=3e-3, rl_steps=100, prompts=64, group=8, updates=16, max_new_tokens=4, lr=1e-4,
                target=0.35, eval_prompts=256, eval_every=10),
    # one GPU: the 8-layer 32-expert research model on 3-digit addition and subtraction, the paper's 16 updates
    "gpu": Size(preset="small", digits=3, ops="+-", pretrain_steps=1500, pretrain_batch=64, seq_len=128,
                pretrain_lr=1e-3, rl_steps=300, prompts=64, group=16, updates=16, max_new_tokens=8, lr=5e-5,
                target=0.5, eval_prompts=1024, eval_every=25),
}


def pretrain(size: Size, out: str) -> str:
    path = os.path.join(out, "pretrain")
    result = train(TrainConfig(
        out=path, preset=size.preset, data="arith", steps=size.pretrain_steps, batch_size=size.pretrain_batch,
        seq_len=size.seq_len, checkpoint_every=size.pretrain_steps, log_every=max(size.pretrain_steps // 10, 1),
        progress=False, task_options={"digits": size.digits, "ops": size.ops},
        optimizer=OptimizerConfig(learning_rate=size.pretrain_lr, warmup_steps=30, schedule="constant",
                                  weight_decay=0.0)))
    print(json.dumps({"pretrain": path, **result.final_eval}), flush=True)
    return path


def rl_config(size: Size, out: str, variant: str, seed: int) -> RLConfig:
    algo, dynamic_sampling = VARIANTS[variant]
    return RLConfig(
        out=out, task="arith", task_options={"digits": size.digits, "ops": size.ops}, steps=size.rl_steps,
        prompts_per_step=size.prompts, updates_per_batch=size.updates, seed=seed,
        rollout=RolloutConfig(group_size=size.group, max_new_tokens=size.max_new_tokens),
        loss=LossConfig(algo=algo), dynamic_sampling=dynamic_sampling,  # GRPO with its paper's KL (beta 0.04)
        optimizer=OptimizerConfig(learning_rate=size.lr, warmup_steps=0, schedule="constant", eps=1e-15,
                                  weight_decay=0.0),
        eval_prompts=size.eval_prompts, eval_every=size.eval_every, checkpoint_every=size.rl_steps, progress=False)


def read_metrics(path: str) -> list[dict]:
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def smoothed(values) -> np.ndarray:
    values = np.asarray(values, np.float64)
    return np.array([values[max(0, i - SMOOTH + 1):i + 1].mean() for i in range(len(values))])


def steps_to(curve: np.ndarray, level: float) -> int | None:
    """The first step (1-based) at which the smoothed curve reaches level, or None within the budget."""
    hits = np.flatnonzero(curve >= level)
    return int(hits[0]) + 1 if hits.size else None


def measure_mismatch(policy, size: Size, prompts: int = 64) -> list[dict]:
    """A bfloat16 engine (bf16 or float32 lm_head, and float32 as the control) against the float32 trainer."""
    config, params = policy
    model = M1ForCausalLM(config)  # the trainer: the default run policy, float32 throughout
    task = get_rl_task("arith", digits=size.digits, ops=size.ops, seed=12345)
    rows = []
    for name, dtype, head in (("float32 engine (control)", "float32", True),
                              ("bfloat16 engine, bf16 lm_head", "bfloat16", False),
                              ("bfloat16 engine, float32 lm_head", "bfloat16", True)):
        rollout = collect_rollout(model, params, task.examples(0, prompts), seed=7, prompt_width=task.max_prompt_len,
                                  config=RolloutConfig(group_size=size.group, max_new_tokens=size.max_new_tokens,
                                                       sampler_compute_dtype=dtype, sampler_float32_lm_head=head))
        rows.append({"engine": name, **rollout.mismatch, "tokens": int(rollout.response_mask.sum())})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def summarise(runs: dict, size: Size) -> dict:
    """Per algorithm: per-seed numbers and their mean / std; paired per-seed differences (PAIRS)."""
    curves = {key: smoothed([r["reward_mean"] for r in rows]) for key, rows in runs.items()}
    dapo_final = float(np.mean([curves[k][-1] for k in curves if k[0] == "dapo"]))
    table = {}
    for algo in ALGOS:
        per_seed = []
        for key in sorted(k for k in runs if k[0] == algo):
            rows, curve = runs[key], curves[key]
            per_seed.append({
                "seed": key[1], "steps_to_target": steps_to(curve, size.target),
                "steps_to_dapo_final": steps_to(curve, dapo_final), "final_reward": float(curve[-1]),
                "mean_reward": float(np.mean([r["reward_mean"] for r in rows])),
                "initial_eval": rows[0].get("eval_accuracy_initial"), "final_eval": rows[-1].get("eval_accuracy"),
                **{k: float(np.mean([r[k] for r in rows]))
                   for k in ("clip_high_frac", "dropped_frac", "kept_groups_frac", "entropy")},
            })
        stats = {field: {"mean": float(np.mean([s[field] for s in per_seed])),
                         "std": float(np.std([s[field] for s in per_seed]))}
                 for field in ("final_reward", "mean_reward", "final_eval", "clip_high_frac", "dropped_frac",
                               "kept_groups_frac")}
        table[algo] = {"per_seed": per_seed, **stats}
    paired = {}
    for first, other in PAIRS:
        diffs = {field: [a[field] - b[field] for a, b in zip(table[first]["per_seed"], table[other]["per_seed"])]
                 for field in ("mean_reward", "final_reward", "final_eval")}
        paired[f"{first} - {other}"] = {field: {"per_seed": values, "mean": float(np.mean(values)),
                                              "std": float(np.std(values))} for field, values in diffs.items()}
    return {"dapo_final_level": dapo_final, "algorithms": table, "paired": paired}


def pm(stat: dict, scale: float = 1.0, digits: int = 3) -> str:
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def per_seed_steps(per_seed: list[dict], field: str) -> str:
    values = [s[field] for s in per_seed]
    text = ", ".join("-" if v is None else str(v) for v in values)
    reached = [v for v in values if v is not None]
    return text + (f" (mean {np.mean(reached):.1f})" if len(reached) == len(values) else
                   f" ({len(reached)}/{len(values)} reached)")


def write_results(args, size: Size, summary: dict, runs: dict, mismatch: list[dict], seconds: float) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, "cispo_vs_baselines" + ("" if args.size == "cpu" else f"_{args.size}"))
    payload = {"size": args.size, "settings": dataclasses.asdict(size), "seeds": args.seeds, "smooth": SMOOTH,
               "seconds": seconds, "summary": summary, "mismatch": mismatch,
               "curves": {f"{a}-seed{s}": [r["reward_mean"] for r in rows] for (a, s), rows in runs.items()}}
    with open(stem + ".json", "w") as f:
        json.dump(payload, f, indent=1)
    algos = summary["algorithms"]
    lines = [
        f"CISPO vs DAPO vs GRPO, size {args.size!r}: preset {size.preset}, arith {size.digits}-digit "
        f"'{size.ops}', {size.rl_steps} generation batches of {size.prompts} prompts x {size.group} samples, "
        f"{size.updates} updates per batch, lr {size.lr}, seeds {args.seeds} (paired: a seed gives every algorithm "
        f"the same prompts). Training reward smoothed over {SMOOTH} steps for the step counts; mean ± std over seeds.",
        "", f"| algorithm | steps to reward {size.target} (per seed) | steps to DAPO's final level "
        f"{summary['dapo_final_level']:.3f} (per seed) | mean reward over the run | final reward | "
        "held-out greedy accuracy |", "|---|---|---|---|---|---|"]
    for algo in ALGOS:
        row = algos[algo]
        lines.append(f"| {algo} | {per_seed_steps(row['per_seed'], 'steps_to_target')} | "
                     f"{per_seed_steps(row['per_seed'], 'steps_to_dapo_final')} | {pm(row['mean_reward'])} | "
                     f"{pm(row['final_reward'])} | {pm(row['final_eval'], 100, 1)}% |")
    lines += ["", "Paired differences (per seed, then mean ± std over seeds):", "",
              "| comparison | mean reward over the run | final reward | held-out accuracy (points) |",
              "|---|---|---|---|"]
    for name, diff in summary["paired"].items():
        lines.append(f"| {name} | {pm(diff['mean_reward'])} | {pm(diff['final_reward'])} | "
                     f"{pm(diff['final_eval'], 100, 1)} |")
    lines += ["", "Where the algorithms differ, the importance ratio r = pi_theta / pi_old (token means over the run):",
              "", "| algorithm | r > 1 + eps_high | gradient dropped by clipping | groups kept (dynamic sampling) |",
              "|---|---|---|---|"]
    for algo in ALGOS:
        row = algos[algo]
        lines.append(f"| {algo} | {pm(row['clip_high_frac'], 100, 2)}% | {pm(row['dropped_frac'], 100, 2)}% | "
                     f"{pm(row['kept_groups_frac'], 100, 1)}% |")
    initial = algos["cispo"]["per_seed"][0]["initial_eval"]
    lines += ["", f"Held-out greedy accuracy before RL: {100 * initial:.1f}%.", "",
              "Training-inference mismatch (per-token probabilities of the sampled responses, trainer in float32):",
              "", "| engine | correlation | largest gap | tokens |", "|---|---|---|---|"]
    lines += [f"| {m['engine']} | {m['mismatch_corr']:.6f} | {m['mismatch_max_gap']:.2e} | {m['tokens']} |"
              for m in mismatch]
    rl_seconds = sum(r["step_seconds"] for rows in runs.values() for r in rows)
    lines += ["", f"Time: {rl_seconds / 60:.1f} min in RL steps over the {len(runs)} runs (compilation included); "
              f"this invocation {seconds / 60:.1f} min (finished runs and the pretraining are reused)."]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(stem + ".png", runs, size, summary)


def plot(path: str, runs: dict, size: Size, summary: dict) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"cispo": "tab:red", "dapo": "tab:blue", "grpo": "tab:green", "cispo_ds": "tab:orange"}
    for algo in ALGOS:
        curves = np.array([smoothed([r["reward_mean"] for r in rows]) for (a, _), rows in sorted(runs.items())
                           if a == algo])
        steps = np.arange(1, curves.shape[1] + 1)
        left.plot(steps, curves.mean(0), color=colors[algo], label=algo)
        left.fill_between(steps, curves.min(0), curves.max(0), color=colors[algo], alpha=0.2)
        evals = [[(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
                 for (a, _), rows in sorted(runs.items()) if a == algo]
        at = [s for s, _ in evals[0]]
        acc = 100 * np.array([[v for _, v in e] for e in evals])
        right.errorbar(at, acc.mean(0), yerr=acc.std(0), color=colors[algo], marker="o", capsize=3, label=algo)
    left.axhline(size.target, color="gray", ls=":", lw=1)
    left.axhline(summary["dapo_final_level"], color="tab:blue", ls="--", lw=1)
    left.set(xlabel="generation batch", ylabel=f"training reward ({SMOOTH}-step mean)",
             title="reward (mean over seeds, band: min-max)")
    right.set(xlabel="generation batch", ylabel="held-out greedy accuracy (%)", title="accuracy (mean ± std)")
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=os.path.join("runs", "cispo_vs_baselines"))
    args = parser.parse_args()
    size, out = SIZES[args.size], os.path.join(args.out, args.size)
    start = time.perf_counter()
    init = pretrain(size, out)
    policy = load_training_output(init)
    mismatch = measure_mismatch(policy, size)
    runs = {}
    for seed in args.seeds:
        for algo in ALGOS:
            path = os.path.join(out, f"{algo}-seed{seed}")
            begin = time.perf_counter()
            train_rl(rl_config(size, path, algo, seed), policy=policy)
            runs[(algo, seed)] = read_metrics(path)
            last = runs[(algo, seed)][-1]
            print(json.dumps({"algo": algo, "seed": seed, "seconds": round(time.perf_counter() - begin, 1),
                              "reward_mean": last["reward_mean"], "eval_accuracy": last.get("eval_accuracy")}),
                  flush=True)
    summary = summarise(runs, size)
    write_results(args, size, summary, runs, mismatch, time.perf_counter() - start)


if __name__ == "__main__":
    main()
