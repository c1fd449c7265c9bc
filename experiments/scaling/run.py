"""The scaling figure: attention time against sequence length T at a constant number of tokens per call.

    PYTHONPATH=. python3 experiments/scaling/run.py --size cpu|gpu [--out DIR] [--deadline-s 200]

Ops (B = tokens / T rows of T tokens, H heads of D dims, bf16):
- ours: `pallas_kernels.lightning_attention.lightning_attention` (impl="auto": Pallas on GPU), forward and
  forward+backward (grad of sum(o * do)). Cost ~ B*T*H*(4*C*D + 4*D^2): linear in T at constant tokens.
- fla: flash-linear-attention's `chunk_simple_gla(q, k, v, g_gamma=-slopes, scale=1.0)` (the same math), when the
  `fla-core` wheel is importable (torch, via DLPack). Its Triton autotuning is cut to each kernel's first config
  unless --fla-autotune (a full autotune costs ~2 minutes of device time): a floor on its speed, not its best.
- softmax: `jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn")` (XLA's on the CPU).
  Cost ~ 2*B*H*T^2*D forward: linear in T at constant tokens too, with a T-times larger slope. Timed while one
  forward call stays under --softmax-limit-s; longer T are skipped and said so.
Whole model: one forward+backward (value_and_grad of the LM loss) of an 8-layer model, M1's 7:1 hybrid against
softmax-only of the same width (one dense expert), tokens per step constant, time per token against T.

Rows go to DIR/scaling_<size>.jsonl as they are measured; the table prints last. Timing: one warm-up call
(compile), then calls until >= 0.2 s or 10 calls, median; block_until_ready around each.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")  # JAX's pool keeps what it took: leave torch room
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.dirname(os.path.dirname(HERE)))  # after PYTHONPATH: a pinned copy of m1jax may come first
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "hybrid_ablation"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

SIZES = {
    "cpu": dict(tokens=1 << 10, lengths=(64, 128, 256), heads=2, head_dim=16, softmax_limit_s=5.0,
                model=dict(layers=2, width=32, heads=2, head_dim=16, vocab=64, tokens=256, lengths=(64, 128))),
    "gpu": dict(tokens=1 << 20, lengths=tuple(1 << p for p in range(10, 21)), heads=8, head_dim=128,
                softmax_limit_s=0.6,
                model=dict(layers=8, width=1024, heads=16, head_dim=64, vocab=8192, tokens=1 << 16,
                           lengths=(2048, 8192, 32768, 65536))),
}


def timed(fn, *args) -> float:
    """Median seconds of fn(*args) after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    while len(times) < 10 and sum(times) < 0.2:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def log(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def load_fla(autotune: bool):
    try:
        import torch
        import triton
        if not autotune:  # keep each autotuned kernel's first config: no benchmarking sweep at first call
            original = triton.autotune

            def first_config(configs, *args, **kwargs):
                return original(configs[:1], *args, **kwargs)
            triton.autotune = first_config
        from fla.ops.simple_gla import chunk_simple_gla
        return torch, chunk_simple_gla
    except Exception as err:  # noqa: BLE001 - the peer is optional
        print(f"flash-linear-attention unavailable: {type(err).__name__}: {err}", flush=True)
        return None, None


def time_fla(torch, chunk_simple_gla, q, k, v, do, slopes):
    tq, tk, tv = (torch.from_dlpack(x).requires_grad_(True) for x in (q, k, v))
    tdo, g_gamma = torch.from_dlpack(do), -torch.from_dlpack(slopes)

    def fwd():
        return chunk_simple_gla(tq, tk, tv, g_gamma=g_gamma, scale=1.0)[0]

    def fwd_bwd():
        fwd().backward(tdo)

    out = {}
    for name, fn in (("fwd", fwd), ("fwdbwd", fwd_bwd)):
        fn()
        torch.cuda.synchronize()
        times = []
        while len(times) < 10 and sum(times) < 0.2:
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    del tq, tk, tv, tdo
    torch.cuda.empty_cache()
    return out


def op_rows(size, path, deadline, fla):
    from pallas_kernels.lightning_attention import lightning_attention
    heads, dim, tokens = size["heads"], size["head_dim"], size["tokens"]
    slopes = jnp.asarray(2.0 ** (-8.0 * (np.arange(heads) + 1) / heads), jnp.float32)
    gpu = jax.default_backend() == "gpu"

    def ours(q, k, v):
        return lightning_attention(q, k, v, slopes)

    def softmax(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=dim ** -0.5,
                                            implementation="cudnn" if gpu else None)

    def fwd_bwd(op):
        return jax.jit(jax.grad(lambda q, k, v, do: jnp.sum((op(q, k, v) * do).astype(jnp.float32)),
                                argnums=(0, 1, 2)))

    softmax_on = True
    for length in size["lengths"]:
        if time.perf_counter() > deadline:
            print(f"deadline: op lengths from {length} not timed", flush=True)
            break
        batch = tokens // length
        keys = jax.random.split(jax.random.key(length), 4)
        q, k, v, do = (jax.random.normal(kk, (batch, length, heads, dim), jnp.bfloat16) for kk in keys)
        row = {"kind": "op", "T": length, "B": batch, "H": heads, "D": dim}
        row["ours_fwd"] = timed(jax.jit(ours), q, k, v)
        row["ours_fwdbwd"] = timed(fwd_bwd(ours), q, k, v, do)
        if softmax_on:
            row["softmax_fwd"] = timed(jax.jit(softmax), q, k, v)
            if row["softmax_fwd"] > size["softmax_limit_s"]:
                softmax_on = False  # the next length costs ~2x: stop here
                row["softmax_note"] = "last softmax length timed (forward over the limit)"
            row["softmax_fwdbwd"] = timed(fwd_bwd(softmax), q, k, v, do)
        if fla[0] is not None:
            try:
                for name, value in time_fla(*fla, q, k, v, do, slopes).items():
                    row[f"fla_{name}"] = value
            except Exception as err:  # noqa: BLE001
                row["fla_error"] = f"{type(err).__name__}: {str(err)[:200]}"
        log(path, row)
        del q, k, v, do


def model_rows(size, path, deadline):
    import optax

    import recall
    from m1jax.config import SOFTMAX, m1_schedule
    spec = size["model"]
    gpu = jax.default_backend() == "gpu"
    layers = spec["layers"]  # 8 on the GPU: M1's 7:1; the CPU smoke's 2 layers give 1:1
    schedules = {"hybrid 7:1": m1_schedule(layers, period=min(8, layers)), "softmax only": (SOFTMAX,) * layers}
    for length in spec["lengths"]:
        for name, types in schedules.items():
            if time.perf_counter() > deadline:
                print(f"deadline: model {name} at T={length} not timed", flush=True)
                return
            arm = recall.Arm(name, len(types), sum(t == SOFTMAX for t in types), spec["heads"], spec["head_dim"])
            config = recall.arm_config(arm, spec["width"], spec["vocab"])
            model = recall.make_model(config, recall.RunPolicy(compute_dtype="bfloat16" if gpu else "float32"))
            batch = spec["tokens"] // length
            ids = jax.random.randint(jax.random.key(length), (batch, length + 1), 0, spec["vocab"])
            params = jax.jit(lambda key: model.init(key, ids[:1, :8])["params"])(jax.random.key(0))

            def loss(p, ids):
                logits = model.apply({"params": p}, ids[:, :-1]).logits
                return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
            step = jax.jit(jax.value_and_grad(loss))
            t0 = time.perf_counter()
            seconds = timed(step, params, ids)
            log(path, {"kind": "model", "schedule": name, "T": length, "B": batch, "tokens": batch * length,
                       "seconds": seconds, "us_per_token": 1e6 * seconds / (batch * length),
                       "params": recall.count_params(config), "wall_s": time.perf_counter() - t0})
            del params


def crossover(rows, a: str, b: str):
    """Smallest T where b's time exceeds a's (log-log interpolation between measured T); None if never, "<T0" if
    b is already slower at the first T."""
    points = sorted((r["T"], r[a], r[b]) for r in rows if a in r and b in r)
    for i, (t, ta, tb) in enumerate(points):
        if tb > ta:
            if i == 0:
                return f"<{t}"
            t0, a0, b0 = points[i - 1]
            r0, r1 = np.log(b0 / a0), np.log(tb / ta)
            return float(np.exp(np.log(t0) + (np.log(t) - np.log(t0)) * (-r0) / (r1 - r0)))
    return None


def report(paths, results_dir):
    """Merge raw jsonl files (one per call; rows keep their call index) into scaling_<size>.json and .png."""
    rows = []
    for call, path in enumerate(paths):
        with open(path) as f:
            rows += [dict(json.loads(line), call=call) for line in f if line.strip()]
    size = next(r["size"] for r in rows if r["kind"] == "meta")
    ops = [r for r in rows if r["kind"] == "op"]
    summary = {}
    for mode in ("fwd", "fwdbwd"):
        same_call = [r for r in ops if f"softmax_{mode}" in r and r["call"] == 0]  # one call: one card
        summary[f"crossover_T_{mode}_softmax_vs_ours"] = crossover(same_call, f"ours_{mode}", f"softmax_{mode}")
    summary["softmax_longest_T"] = max((r["T"] for r in ops if "softmax_fwd" in r), default=None)
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, f"scaling_{size}.json"), "w") as f:
        json.dump({"summary": summary, "rows": rows}, f, indent=1)
    print(json.dumps(summary))
    import matplotlib
    matplotlib.use("Agg")
    plot(rows, summary, os.path.join(results_dir, f"scaling_{size}.png"))
    return summary


def plot(rows, summary, path):
    import matplotlib.pyplot as plt
    ops = [r for r in rows if r["kind"] == "op"]
    models = [r for r in rows if r["kind"] == "model"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"ours": ("lightning (ours, Pallas)", "C0"), "fla": ("FLA chunk_simple_gla (untuned)", "C2"),
              "softmax": ("softmax, cuDNN flash", "C3")}
    for ax, mode in zip(axes[:2], ("fwd", "fwdbwd")):
        for op, (label, color) in styles.items():
            points = {}
            for r in sorted(ops, key=lambda r: r["call"]):
                if f"{op}_{mode}" in r:
                    points.setdefault(r["T"], r[f"{op}_{mode}"])  # the first call that measured this T
            if points:
                ts = sorted(points)
                ax.plot(ts, [1e3 * points[t] for t in ts], marker="o", color=color, label=label)
        cross = summary[f"crossover_T_{mode}_softmax_vs_ours"]
        if isinstance(cross, float):
            ax.axvline(cross, color="gray", ls="--", lw=1)
            ax.text(cross, 0.5, f" crossover ~{cross / 1024:.1f}K", fontsize=8, color="gray",
                    transform=ax.get_xaxis_transform())
        elif cross:
            ax.text(0.02, 0.92, f"softmax slower already at T={cross[1:]}", transform=ax.transAxes, fontsize=8)
        tokens = ops[0]["B"] * ops[0]["T"] if ops else 0
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"sequence length T ({tokens} tokens per call: B = {tokens} / T)")
        ax.set_ylabel("ms per call (median)")
        ax.set_title(f"{'forward' if mode == 'fwd' else 'forward + backward'}, H={ops[0]['H'] if ops else '?'} "
                     f"D={ops[0]['D'] if ops else '?'}, bf16", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right")
    ax = axes[2]
    for schedule, color in (("hybrid 7:1", "C0"), ("softmax only", "C3")):
        points = {}
        for r in sorted(models, key=lambda r: r["call"]):
            if r["schedule"] == schedule:
                points.setdefault(r["T"], r["us_per_token"])
        ts = sorted(points)
        ax.plot(ts, [points[t] for t in ts], marker="o", color=color, label=schedule)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length T (65536 tokens per step)")
    ax.set_ylabel("µs per token, forward + backward")
    ax.set_title("8-layer model, width 1024, ~0.1B params", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    from report import finish_figure  # experiments/hybrid_ablation/report.py (on the path above)
    return finish_figure(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--out", default=os.path.join("runs", "scaling"))
    parser.add_argument("--deadline-s", type=float, default=1e9)
    parser.add_argument("--fla-autotune", action="store_true")
    parser.add_argument("--op-lengths", default=None, help="comma list overriding the size's op lengths")
    parser.add_argument("--model-lengths", default=None, help="comma list overriding the size's model lengths")
    parser.add_argument("--report", nargs="+", default=None, help="scaling_*.jsonl files (one per call): merge "
                        "them into --results-dir/scaling_<size>.json|png, no timing")
    parser.add_argument("--results-dir", default=os.path.join(os.path.dirname(HERE), "results"))
    parser.add_argument("--skip", default="", help="comma list of parts to skip: ops, model")
    args = parser.parse_args(argv)
    if args.report:
        return report(args.report, args.results_dir)
    size = dict(SIZES[args.size])
    if args.op_lengths:
        size["lengths"] = tuple(int(x) for x in args.op_lengths.split(","))
    if args.model_lengths:
        size["model"] = dict(size["model"], lengths=tuple(int(x) for x in args.model_lengths.split(",")))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"scaling_{args.size}.jsonl")
    deadline = time.perf_counter() + args.deadline_s
    log(path, {"kind": "meta", "device": jax.devices()[0].device_kind, "size": args.size,
               "date": time.strftime("%Y-%m-%d", time.gmtime()), "fla_autotune": args.fla_autotune})
    skip = set(filter(None, args.skip.split(",")))
    fla = load_fla(args.fla_autotune) if jax.default_backend() == "gpu" else (None, None)
    if "model" not in skip:  # the model rows first: they are the shorter list and the one the op rows do not give
        model_rows(size, path, deadline - 0.5 * args.deadline_s if args.deadline_s < 1e8 else deadline)
    if "ops" not in skip:
        op_rows(size, path, deadline, fla)
    return path


if __name__ == "__main__":
    main()
