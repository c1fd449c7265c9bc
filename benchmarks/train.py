"""Training throughput and MFU of "research-1b" at T=8192 on one GPU, with and without rematerialisation.

    PYTHONPATH=. python3 benchmarks/train.py [--smoke] [--batch-size 4] [--seq-len 8192] [--steps 6]

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


def setup(preset: str, batch_size: int, seq_len: int, remat: str):
    """The benchmarked step: (config, jitted step (donates the state), initial state, a batch of random tokens).
    bf16 compute, float32 master weights and AdamW; also used by benchmarks/train_profile.py."""
    cfg = M1Config.from_preset(preset)
    model = M1ForCausalLM(cfg, RunPolicy(compute_dtype="bfloat16", param_dtype="float32", remat=remat))
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-4, warmup_steps=1, total_steps=100))
    state = jax.jit(lambda: init_state(model, optimizer, 0))()
    step = make_train_step(model, optimizer)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (batch_size, seq_len + 1)).astype(np.int32)
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
             "loss_mask": jnp.ones((batch_size, seq_len), jnp.float32),
             "segment_ids": jnp.ones((batch_size, seq_len), jnp.int32)}
    return cfg, step, state, batch


def run(preset: str, batch_size: int, seq_len: int, steps: int, remat: str) -> dict:
    cfg, step, state, batch = setup(preset, batch_size, seq_len, remat)
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
    return {"preset": preset, "remat": remat, "batch": batch_size, "seq_len": seq_len, "step_ms": 1e3 * seconds,
            "tokens_per_s": batch_size * seq_len / seconds, "tflops": flops / seconds / 1e12,
            "mfu": flops / seconds / peak if peak else None, "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
            "compile_s": compile_s, "loss": float(metrics["loss"]), "device": device.device_kind}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the CPU")
    parser.add_argument("--preset", default="research-1b")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--remat", nargs="+", default=["none", "dots", "full"])
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.batch_size, args.seq_len, args.steps = "tiny", 2, 64, 2
    rows = []
    for remat in args.remat:
        try:
            rows.append(run(args.preset, args.batch_size, args.seq_len, args.steps, remat))
        except Exception as err:  # out of memory without remat is a result too
            rows.append({"preset": args.preset, "remat": remat, "error": f"{type(err).__name__}: {str(err)[:160]}"})
        print(json.dumps(rows[-1]), flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "train.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"\n{'preset':12} {'remat':6} {'B x T':>12} {'ms/step':>9} {'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'peak GiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:12} {r['remat']:6} {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
        print(f"{r['preset']:12} {r['remat']:6} {r['batch']:>4} x {r['seq_len']:<6} {r['step_ms']:9.1f} "
              f"{r['tokens_per_s']:10,.0f} {r['tflops']:8.1f} {mfu:>6} {r['peak_gib']:9.2f}")


if __name__ == "__main__":
    main()
