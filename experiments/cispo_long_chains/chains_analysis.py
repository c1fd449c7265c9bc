"""Summaries, tables and plots of the long-chain comparison (run.py): per algorithm and seed, the reward and held-out
accuracy, the steps to DAPO's final reward, and the mechanism (tokens outside the clip band: how many, which roles,
which old-policy probabilities; entropy, response length, gradient norms); paired differences by seed."""
from __future__ import annotations

import json
import os
import sys

import numpy as np

SMOOTH = 5  # steps in the trailing mean of the training reward
PAIRS = (("cispo", "dapo"), ("cispo", "grpo"))
CURVES = ("reward_mean", "clip_high_frac", "dropped_frac", "entropy_rollout", "response_length", "grad_norm",
          "grad_norm_max", "mismatch_corr", "kept_groups_frac")


def smoothed(values) -> np.ndarray:
    values = np.asarray(values, np.float64)
    return np.array([values[max(0, i - SMOOTH + 1):i + 1].mean() for i in range(len(values))])


def steps_to(curve: np.ndarray, level: float) -> int | None:
    """The first step (1-based) at which the smoothed curve reaches level, or None within the budget."""
    hits = np.flatnonzero(curve >= level - 1e-12)
    return int(hits[0]) + 1 if hits.size else None


def _stat(values) -> dict:
    values = [v for v in values if v is not None]
    return {"mean": float(np.mean(values)) if values else None, "std": float(np.std(values)) if values else None}


def token_summary(lines: list[dict]) -> dict:
    """Clipped-token summaries (trainer.clip_token_stats lines) summed over steps and seeds."""
    counts = {k: int(sum(line["counts"][k] for line in lines)) for k in lines[0]["counts"]}
    roles = {}
    for line in lines:
        for role, values in line["by_role"].items():
            roles[role] = [a + b for a, b in zip(roles.get(role, [0, 0, 0, 0]), values)]
    by_byte = {}
    for line in lines:
        for byte, values in line["by_byte"].items():
            by_byte[byte] = [a + b for a, b in zip(by_byte.get(byte, [0, 0, 0, 0]), values)]
    hist = {k: np.sum([line["prob_hist"][k] for line in lines], axis=0).tolist() for k in lines[0]["prob_hist"]}
    top = sorted((t for line in lines for t in line["top_high"]), key=lambda t: -t["ratio"])[:20]
    return {"counts": counts, "high_positive": int(sum(line["high_positive"] for line in lines)),
            "by_role": roles, "by_byte": by_byte, "prob_hist": hist, "top_high": top}


def summarise(runs: dict, tokens: list[dict], algos) -> dict:
    """runs: (algo, seed) -> metrics.jsonl records; tokens: tagged clip_token_stats lines."""
    curves = {key: smoothed([r["reward_mean"] for r in rows]) for key, rows in runs.items()}
    dapo_keys = [k for k in curves if k[0] == "dapo"]
    dapo_final = float(np.mean([curves[k][-1] for k in dapo_keys])) if dapo_keys else float("nan")
    table = {}
    for algo in algos:
        per_seed = []
        for key in sorted(k for k in runs if k[0] == algo):
            rows, curve = runs[key], curves[key]
            grad = [r["grad_norm"] for r in rows]
            per_seed.append({
                "seed": key[1], "steps": len(rows), "steps_to_dapo_final": steps_to(curve, dapo_final),
                "final_reward": float(curve[-1]), "mean_reward": float(np.mean([r["reward_mean"] for r in rows])),
                "initial_eval": rows[0].get("eval_accuracy_initial"), "final_eval": rows[-1].get("eval_accuracy"),
                "grad_norm_mean": float(np.mean(grad)), "grad_norm_cv": float(np.std(grad) / max(np.mean(grad), 1e-12)),
                "grad_norm_max": float(np.max([r.get("grad_norm_max", r["grad_norm"]) for r in rows])),
                "entropy_first": rows[0]["entropy_rollout"], "entropy_last": rows[-1]["entropy_rollout"],
                "length_first": rows[0]["response_length"], "length_last": rows[-1]["response_length"],
                **{k: float(np.mean([r[k] for r in rows]))
                   for k in ("clip_high_frac", "clip_low_frac", "dropped_frac", "kept_groups_frac", "mismatch_corr")},
            })
        fields = [k for k in per_seed[0] if k not in ("seed", "steps", "steps_to_dapo_final")] if per_seed else []
        stats = {field: _stat([s[field] for s in per_seed]) for field in fields}
        lines = [t for t in tokens if t["algo"] == algo]
        table[algo] = {"per_seed": per_seed, **stats, "tokens": token_summary(lines) if lines else None}
    paired = {}
    for first, other in PAIRS:
        a, b = table[first]["per_seed"], table[other]["per_seed"]
        seeds = sorted({s["seed"] for s in a} & {s["seed"] for s in b})
        pick = lambda rows, seed: next(r for r in rows if r["seed"] == seed)  # noqa: E731
        diffs = {field: [pick(a, s)[field] - pick(b, s)[field] for s in seeds
                         if pick(a, s)[field] is not None and pick(b, s)[field] is not None]
                 for field in ("mean_reward", "final_reward", "final_eval")}
        paired[f"{first} - {other}"] = {field: {"per_seed": v, **_stat(v)} for field, v in diffs.items()}
    return {"dapo_final_level": dapo_final, "algorithms": table, "paired": paired}


def pm(stat: dict, scale: float = 1.0, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def _steps(per_seed: list[dict]) -> str:
    values = [s["steps_to_dapo_final"] for s in per_seed]
    reached = [v for v in values if v is not None]
    return ", ".join("-" if v is None else str(v) for v in values) + (
        f" (mean {np.mean(reached):.1f})" if reached and len(reached) == len(values)
        else f" ({len(reached)}/{len(values)} reached)")


def markdown(args, size, setup: dict, lrs: dict, summary: dict, runs: dict, seconds: float) -> list[str]:
    algos = summary["algorithms"]
    steps = max(len(rows) for rows in runs.values())
    lines = [
        f"CISPO vs DAPO vs GRPO on {size.describe()}, size {args.size!r}: {steps} generation batches of "
        f"{size.prompts} prompts x {size.group} samples, {size.updates} updates per batch, learning rates {lrs} "
        f"(sweep of {sorted(map(float, _swept(setup, size)))}), seeds {args.seeds} (paired). "
        f"Training reward smoothed over {SMOOTH} steps; mean ± std over seeds.", "",
        f"| algorithm | steps to DAPO's final reward {summary['dapo_final_level']:.3f} (per seed) | mean reward | "
        "final reward | held-out greedy accuracy | tokens r > 1.28 | tokens r < 0.8 | gradient dropped (own rule) |",
        "|---|---|---|---|---|---|---|---|"]
    for algo, row in algos.items():
        if not row["per_seed"]:
            continue
        counts = row["tokens"]["counts"] if row["tokens"] else None  # pooled over seeds and steps
        band = (f"{100 * counts['high'] / max(counts['tokens'], 1):.2f}% | "
                f"{100 * counts['low'] / max(counts['tokens'], 1):.2f}%") if counts else "- | -"
        lines.append(f"| {algo} | {_steps(row['per_seed'])} | {pm(row['mean_reward'])} | {pm(row['final_reward'])} | "
                     f"{pm(row['final_eval'], 100, 1)}% | {band} | {pm(row['dropped_frac'], 100, 2)}% |")
    lines += ["", "Paired differences (mean ± std over seeds):", "",
              "| comparison | mean reward | final reward | held-out accuracy (points) |", "|---|---|---|---|"]
    for name, diff in summary["paired"].items():
        lines.append(f"| {name} | {pm(diff['mean_reward'])} | {pm(diff['final_reward'])} | "
                     f"{pm(diff['final_eval'], 100, 1)} |")
    lines += ["", "Stability and length:", "", "| algorithm | entropy first -> last batch | response bytes first -> "
              "last | grad norm mean | grad norm CV over steps | largest grad norm |", "|---|---|---|---|---|---|"]
    for algo, row in algos.items():
        if row["per_seed"]:
            lines.append(f"| {algo} | {pm(row['entropy_first'])} -> {pm(row['entropy_last'])} | "
                         f"{pm(row['length_first'], 1, 1)} -> {pm(row['length_last'], 1, 1)} | "
                         f"{pm(row['grad_norm_mean'])} | {pm(row['grad_norm_cv'])} | {pm(row['grad_norm_max'])} |")
    lines += ["", "Tokens outside the band (r > 1.28) by role, summed over seeds and steps: share of that role's "
              "tokens (and of all such tokens):", "", "| algorithm | " + " | ".join(_roles(algos)) + " |",
              "|---|" + "---|" * len(_roles(algos))]
    for algo, row in algos.items():
        tok = row["tokens"]
        if tok:
            high_total = max(tok["counts"]["high"], 1)
            cells = [f"{100 * v[1] / max(v[0], 1):.2f}% ({100 * v[1] / high_total:.0f}%)" for v in
                     (tok["by_role"][r] for r in _roles(algos))]
            lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    lines += ["", "Old-policy probability of the tokens (share in each bin):", "",
              "| algorithm | tokens | " + " | ".join(_bins()) + " |", "|---|---|" + "---|" * len(_bins())]
    for algo, row in algos.items():
        tok = row["tokens"]
        if tok:
            for name in ("tokens", "high", "dropped"):
                counts = np.asarray(tok["prob_hist"][name], np.float64)
                cells = [f"{100 * c / max(counts.sum(), 1):.1f}%" for c in counts]
                lines.append(f"| {algo} | {name} ({int(counts.sum())}) | " + " | ".join(cells) + " |")
    lines += ["", "Training-inference mismatch on the pretrained model (per-token probabilities, trainer float32):",
              "", "| engine | correlation | largest gap | tokens |", "|---|---|---|---|"]
    lines += [f"| {m['engine']} | {m['mismatch_corr']:.6f} | {m['mismatch_max_gap']:.2e} | {m['tokens']} |"
              for m in setup["mismatch"]]
    chosen = setup["pretrain"]["chosen"]
    lines += ["", f"Pretrained checkpoint: step {chosen['step']}, {setup['pretrain']['params']:,} parameters, "
              f"greedy accuracy {100 * chosen['greedy_accuracy']:.1f}%, sampled (T=1) "
              f"{100 * chosen['sampled_accuracy']:.1f}%, mean response {chosen['response_bytes']:.0f} bytes.",
              f"Time: {seconds / 60:.1f} min " + _time_of(args, runs)]
    return lines


def _time_of(args, runs: dict) -> str:
    if getattr(args, "records", None):  # run.py --phase report
        return f"of RL, summed over the {len(runs)} runs exported to {len(args.records)} directories."
    return "for this invocation."


def _swept(setup: dict, size) -> list:
    table = setup.get("sweep", {}).get("second_half_reward", {})
    return list(next(iter(table.values()))) if table else list(size.sweep_lrs)


def _roles(algos: dict) -> list[str]:
    for row in algos.values():
        if row["tokens"]:
            return list(row["tokens"]["by_role"])
    return []


def _bins() -> list[str]:
    from m1jax.rl.trainer import PROB_BINS
    return [f"{lo:g}-{min(hi, 1.0):g}" for lo, hi in zip(PROB_BINS[:-1], PROB_BINS[1:])]


def write_results(stem: str, args, size, setup: dict, lrs: dict, summary: dict, runs: dict, seconds: float) -> None:
    import dataclasses
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    payload = {"size": args.size, "settings": dataclasses.asdict(size), "seeds": args.seeds, "smooth": SMOOTH,
               "learning_rates": lrs, "seconds": seconds, "setup": setup, "summary": summary,
               "curves": {f"{a}-seed{s}": {k: [r.get(k) for r in rows] for k in CURVES + ("eval_accuracy",)}
                          for (a, s), rows in runs.items()}}
    with open(stem + ".json", "w") as f:
        json.dump(payload, f, indent=1)
    lines = markdown(args, size, setup, lrs, summary, runs, seconds)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    plot(stem + ".png", payload)


def plot(path: str, payload: dict) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    colors = {"cispo": "tab:red", "dapo": "tab:blue", "grpo": "tab:green"}
    panels = (("reward_mean", f"training reward ({SMOOTH}-step mean)", True), ("eval_accuracy", "held-out greedy "
              "accuracy", False), ("clip_high_frac", "tokens with r > 1 + own eps_high", False), ("entropy_rollout",
              "entropy (nats/token)", False), ("response_length", "response length (bytes)", False),
              ("grad_norm", "grad norm (mean of 16 updates)", False))
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, (key, label, smooth) in zip(axes.flat, panels):
        for algo, color in colors.items():
            series = [v[key] for k, v in sorted(payload["curves"].items()) if k.startswith(algo + "-")]
            if not series:
                continue
            if key == "eval_accuracy":  # the evaluation before RL at step 0
                initial = [s["initial_eval"] for s in sorted(payload["summary"]["algorithms"][algo]["per_seed"],
                                                            key=lambda s: s["seed"])]
                if None in initial:  # runs without evaluations
                    continue
                points = [[(0, x0)] + [(i + 1, x) for i, x in enumerate(s) if x is not None]
                          for x0, s in zip(initial, series)]
                at = [p[0] for p in points[0]]
                values = np.array([[x for _, x in p] for p in points])
            else:
                length = min(map(len, series))
                values = np.array([smoothed(s[:length]) if smooth else s[:length] for s in series], np.float64)
                at = np.arange(1, length + 1)
            ax.plot(at, values.mean(0), color=color, label=algo, marker="o" if key == "eval_accuracy" else None)
            ax.fill_between(at, values.min(0), values.max(0), color=color, alpha=0.2)
        ax.set(xlabel="generation batch", title=label)
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
