"""Training throughput and MFU of "research-1b" at T=8192 on one GPU, with and without rematerialisation.

    PYTHONPATH=. python3 benchmarks/train.py [--smoke] [--batch-size 4] [--seq-len 8192] [--steps 6]
        [--remat none dots full] [--lm-head float32 bfloat16] [--curve-steps 0] [--moe-kernels default]

--lm-head: the vocabulary head's precision (RunPolicy.float32_lm_head): "float32" (the paper's fix, the default)
or "bfloat16" (operands and logits in bf16, accumulation in float32). --curve-steps N > 0 also trains every head
variant N steps from the same initial state on the same learnable batch (each row a random 64-token phrase
repeated, so the loss falls) and prints both loss curves and their largest difference: the check that a faster
path keeps the numerics.

MFU = model FLOPs (m1jax.flops.train_flops: 3x the analytic forward, remat not counted) / step time / the
datasheet dense bf16 peak (989.4 TFLOP/s for H100 and H200 SXM). Peak memory from the device's allocator stats.
Prints a table last; writes JSON lines to $OUT/train.jsonl when $OUT is set.
"""
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from m1jax.config import M1Config, RunPolicy
from m1jax.flops import peak_flops_per_device, train_flops
from m1jax.model import M1ForCausalLM
from m1jax.train.optimizer import OptimizerConfig, make_optimizer
from m1jax.train.step import init_state, make_train_step
from pallas_kernels.grouped_matmul import ops as grouped_ops


LM_HEADS = {"float32": True, "bfloat16": False}  # --lm-head -> RunPolicy.float32_lm_head


def setup(preset: str, batch_size: int, seq_len: int, remat: str, lm_head: str = "float32",
          learnable: bool = False, learning_rate: float = 1e-4):
    """The benchmarked step: (config, jitted step (donates the state), initial state, a batch of random tokens).
    bf16 compute, float32 master weights and AdamW; also used by benchmarks/train_profile.py. learnable: each row
    is a random 64-token phrase repeated (the loss can fall: the loss-curve check)."""
    if lm_head not in LM_HEADS:
        raise SystemExit(f"--lm-head {lm_head!r}: choose from {sorted(LM_HEADS)}")
    cfg = M1Config.from_preset(preset)
    model = M1ForCausalLM(cfg, RunPolicy(compute_dtype="bfloat16", param_dtype="float32", remat=remat,
                                         float32_lm_head=LM_HEADS[lm_head]))
    optimizer = make_optimizer(OptimizerConfig(learning_rate=learning_rate, warmup_steps=1, total_steps=100))
    state = jax.jit(lambda: init_state(model, optimizer, 0))()
    step = make_train_step(model, optimizer)
    rng = np.random.default_rng(0)
    if learnable:
        phrase = rng.integers(0, cfg.vocab_size, (batch_size, 64))
        tokens = np.tile(phrase, (1, -(-(seq_len + 1) // 64)))[:, :seq_len + 1].astype(np.int32)
    else:
        tokens = rng.integers(0, cfg.vocab_size, (batch_size, seq_len + 1)).astype(np.int32)
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
             "loss_mask": jnp.ones((batch_size, seq_len), jnp.float32),
             "segment_ids": jnp.ones((batch_size, seq_len), jnp.int32)}
    return cfg, step, state, batch


def run(preset: str, batch_size: int, seq_len: int, steps: int, remat: str, lm_head: str = "float32") -> dict:
    cfg, step, state, batch = setup(preset, batch_size, seq_len, remat, lm_head)
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    device = jax.devices()[0]
    peak = peak_flops_per_device(device.device_kind)
    stats = device.memory_stats() or {}
    flops = train_flops(cfg, seq_len, batch_size)
    return {"preset": preset, "remat": remat, "lm_head": lm_head, "batch": batch_size, "seq_len": seq_len, "step_ms": 1e3 * seconds,
            "tokens_per_s": batch_size * seq_len / seconds, "tflops": flops / seconds / 1e12,
            "mfu": flops / seconds / peak if peak else None, "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
            "compile_s": compile_s, "loss": float(metrics["loss"]), "device": device.device_kind}


def loss_curve(preset: str, batch_size: int, seq_len: int, steps: int, lm_head: str) -> list[float]:
    """Losses of `steps` steps (lr 1e-3) on the learnable batch, from the same seed-0 initial state."""
    _, step, state, batch = setup(preset, batch_size, seq_len, "none", lm_head, learnable=True, learning_rate=1e-3)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the CPU")
    parser.add_argument("--preset", default="research-1b")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--remat", nargs="+", default=["none", "dots", "full"])
    parser.add_argument("--lm-head", nargs="+", default=["float32"], choices=sorted(LM_HEADS))
    parser.add_argument("--curve-steps", type=int, default=0)
    parser.add_argument("--moe-kernels", choices=("default", "mosaic"), default="default",
                        help="mosaic: the grouped matmul's Mosaic GPU kernels where their tiles divide, on a Hopper "
                             "GPU (ops.MOSAIC_BY_DEFAULT; compare two processes' tables and curves)")
    args = parser.parse_args()
    grouped_ops.MOSAIC_BY_DEFAULT = args.moe_kernels == "mosaic"  # read when a step is traced
    if args.smoke:
        args.preset, args.batch_size, args.seq_len, args.steps = "tiny", 2, 64, 2
    curves = {}
    for head in args.lm_head if args.curve_steps > 0 else ():
        curves[head] = loss_curve(args.preset, args.batch_size, args.seq_len, args.curve_steps, head)
        print(json.dumps({"lm_head": head, "moe_kernels": args.moe_kernels, "curve": curves[head]}), flush=True)
    rows = []
    for remat in args.remat:
        for head in args.lm_head:
            try:
                rows.append(run(args.preset, args.batch_size, args.seq_len, args.steps, remat, head)
                            | {"moe_kernels": args.moe_kernels})
            except Exception as err:  # out of memory without remat is a result too
                rows.append({"preset": args.preset, "remat": remat, "lm_head": head,
                             "error": f"{type(err).__name__}: {str(err)[:160]}"})
            print(json.dumps(rows[-1]), flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "train.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if len(curves) > 1:
        first, *others = curves
        for other in others:
            gaps = [abs(a - b) for a, b in zip(curves[first], curves[other])]
            print(f"\nloss curves, lm_head {first} vs {other} ({args.curve_steps} steps): {curves[first][0]:.4f} -> "
                  f"{curves[first][-1]:.4f} vs {curves[other][0]:.4f} -> {curves[other][-1]:.4f}; largest gap "
                  f"{max(gaps):.4f} (step {gaps.index(max(gaps))})")
    print(f"\n{'preset':12} {'remat':6} {'lm_head':8} {'B x T':>12} {'ms/step':>9} {'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'peak GiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:12} {r['remat']:6} {r['lm_head']:8} {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
        print(f"{r['preset']:12} {r['remat']:6} {r['lm_head']:8} {r['batch']:>4} x {r['seq_len']:<6} {r['step_ms']:9.1f} "
              f"{r['tokens_per_s']:10,.0f} {r['tflops']:8.1f} {mfu:>6} {r['peak_gib']:9.2f}")


if __name__ == "__main__":
    main()
