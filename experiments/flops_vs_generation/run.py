"""M1 vs DeepSeek-R1: theoretical inference FLOPs against generation length (the paper's Figure 1, right).

    python experiments/flops_vs_generation/run.py      -> experiments/results/flops_vs_generation.{json,md,png}

M1's per-token cost comes from m1jax.flops (70 lightning layers: constant per token; 10 softmax layers: linear in
the context). DeepSeek-R1's from its config.json (deepseek-ai/DeepSeek-R1): 61 layers (3 dense, 58 MoE with 256
routed experts top-8 + 1 shared, width 2048), hidden 7168, MLA with 128 heads (q LoRA 1536, kv LoRA 512, qk 128+64
rope dims, v 128), vocab 129,280; attention counted without weight absorption: per head 2*(192 + 128) FLOPs per
context token. Reported: the cost of the t-th generated token, and the cumulative cost of generating t tokens.
"""
import json
import os

import numpy as np

from m1jax.config import M1Config
from m1jax.flops import decode_flops_per_token

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = [4096, 8192, 16384, 32768, 65536, 100_000, 131072]

R1 = dict(hidden=7168, layers=61, dense_layers=3, dense_width=18432, experts=256, top_k=8, shared=1,
          expert_width=2048, heads=128, q_lora=1536, kv_lora=512, qk_nope=128, qk_rope=64, v_dim=128, vocab=129280)


def r1_flops_per_token(context: int) -> float:
    c = R1
    qk = c["qk_nope"] + c["qk_rope"]
    mla = (c["hidden"] * c["q_lora"] + c["q_lora"] * c["heads"] * qk + c["hidden"] * (c["kv_lora"] + c["qk_rope"])
           + c["kv_lora"] * c["heads"] * (c["qk_nope"] + c["v_dim"]) + c["heads"] * c["v_dim"] * c["hidden"])
    attention_core = c["heads"] * 2 * (qk + c["v_dim"]) * context
    dense = 3 * c["hidden"] * c["dense_width"]
    moe = c["hidden"] * c["experts"] + (c["top_k"] + c["shared"]) * 3 * c["hidden"] * c["expert_width"]
    per_layer = 2 * mla + attention_core
    total = c["layers"] * per_layer + c["dense_layers"] * 2 * dense + (c["layers"] - c["dense_layers"]) * 2 * moe
    return total + 2 * c["hidden"] * c["vocab"]


def cumulative(per_token, length: int, prompt: int = 0, samples: int = 512) -> float:
    """Sum of per-token costs for tokens at contexts prompt..prompt+length-1 (trapezoid over `samples` points:
    the costs are linear in the context, so this is exact up to rounding)."""
    xs = np.linspace(prompt, prompt + length - 1, samples)
    ys = np.array([per_token(int(x)) for x in xs])
    return float(np.trapezoid(ys, xs) + (ys[0] + ys[-1]) / 2)


def main():
    m1 = M1Config.from_preset("minimax-m1-80k")
    m1_token = lambda t: decode_flops_per_token(m1, t)
    rows = []
    for n in LENGTHS:
        rows.append({"generated_tokens": n,
                     "m1_per_token": m1_token(n), "r1_per_token": r1_flops_per_token(n),
                     "m1_cumulative": cumulative(m1_token, n), "r1_cumulative": cumulative(r1_flops_per_token, n)})
        rows[-1]["ratio_per_token"] = rows[-1]["m1_per_token"] / rows[-1]["r1_per_token"]
        rows[-1]["ratio_cumulative"] = rows[-1]["m1_cumulative"] / rows[-1]["r1_cumulative"]
    results = os.path.join(ROOT, "results")
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, "flops_vs_generation.json"), "w") as f:
        json.dump(rows, f, indent=1)
    lines = ["| generated tokens | M1 / R1, FLOPs of that token | M1 / R1, cumulative FLOPs |", "|---|---|---|"]
    lines += [f"| {r['generated_tokens']:,} | {r['ratio_per_token']:.2f} | {r['ratio_cumulative']:.2f} |"
              for r in rows]
    table = "\n".join(lines)
    with open(os.path.join(results, "flops_vs_generation.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    xs = np.array(LENGTHS)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs / 1000, [r["m1_cumulative"] / 1e15 for r in rows], "o-", label="MiniMax-M1 (analytic)")
    ax.plot(xs / 1000, [r["r1_cumulative"] / 1e15 for r in rows], "s-", label="DeepSeek-R1 (analytic)")
    ax.set_xlabel("generation length (K tokens)")
    ax.set_ylabel("cumulative inference FLOPs (PFLOP)")
    ax.set_title("Theoretical inference FLOPs vs generation length")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(results, "flops_vs_generation.png"), dpi=120)


if __name__ == "__main__":
    main()
