"""The canonical hybrid ablation on multi-query associative recall (mqar): pure lightning attention vs M1's 7:1
hybrid vs pure softmax attention, same widths and parameter counts, same data and optimizer.

    python experiments/hybrid_ablation/run.py [--steps 300] [--seeds 0 1] [--out runs/hybrid_ablation]

Linear attention with a fixed-size state is expected to fail recall once the pairs outgrow its state; one softmax
layer in eight is expected to recover it. Results: experiments/results/hybrid_ablation.{json,md,png}.
"""
import argparse
import json
import os
import time

from m1jax.config import LIGHTNING, SOFTMAX, m1_schedule
from m1jax.train.loop import TrainConfig, train
from m1jax.train.optimizer import OptimizerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULES = {"lightning only": (LIGHTNING,) * 8, "hybrid 7:1 (M1)": m1_schedule(8), "softmax only": (SOFTMAX,) * 8}
MODEL = dict(vocab_size=512, hidden_size=128, num_heads=4, num_kv_heads=4, head_dim=32, num_experts=4,
             experts_per_token=2, expert_size=256, rotary_dim=32, rope_theta=10_000.0, block_size=64,
             max_position_embeddings=4096)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=256, help="task ids: (vocab-1)//2 keys, the rest values")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=os.path.join("runs", "hybrid_ablation"))
    args = parser.parse_args()
    rows = []
    for name, schedule in SCHEDULES.items():
        for seed in args.seeds:
            out = os.path.join(args.out, f"{name.split()[0]}-seed{seed}")
            start = time.perf_counter()
            result = train(TrainConfig(
                out=out, preset="tiny", data="mqar", steps=args.steps, batch_size=args.batch_size,
                seq_len=args.seq_len, seed=seed, log_every=max(args.steps // 20, 1),
                eval_every=max(args.steps // 10, 1), progress=False,
                optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=args.steps // 10),
                model_overrides=dict(MODEL, layer_types=schedule),
                task_options={"num_pairs": args.pairs, "vocab": args.vocab}))
            rows.append({"schedule": name, "seed": seed, "seconds": time.perf_counter() - start,
                         "final_loss": result.history[-1]["loss"], **result.final_eval,
                         "curve": [(r["step"], r.get("eval_accuracy")) for r in result.history
                                   if "eval_accuracy" in r]})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
    write_results(rows, args)


def write_results(rows, args):
    results = os.path.join(ROOT, "results")
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, "hybrid_ablation.json"), "w") as f:
        json.dump({"args": vars(args), "runs": rows}, f, indent=1)
    lines = [f"mqar, {args.pairs} pairs, task vocab {args.vocab}, T={args.seq_len}, batch {args.batch_size}, "
             f"{args.steps} steps, seeds {args.seeds}; held-out recall accuracy", "",
             "| schedule | recall accuracy (mean over seeds) | per seed | final train loss |", "|---|---|---|---|"]
    for name in SCHEDULES:
        runs = [r for r in rows if r["schedule"] == name]
        accs = [r["eval_accuracy"] for r in runs]
        lines.append(f"| {name} | {100 * sum(accs) / len(accs):.1f}% | "
                     f"{', '.join(f'{100 * a:.1f}%' for a in accs)} | "
                     f"{sum(r['final_loss'] for r in runs) / len(runs):.3f} |")
    with open(os.path.join(results, "hybrid_ablation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        steps, accs = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(steps, [100 * a for a in accs], marker="o", label=f"{r['schedule']} (seed {r['seed']})")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out recall accuracy (%)")
    ax.set_title(f"mqar, {args.pairs} key-value pairs")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(results, "hybrid_ablation.png"), dpi=120)


if __name__ == "__main__":
    main()
