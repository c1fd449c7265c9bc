"""Lightning attention on one GPU: correctness against the recurrence, kernel tuning, and the peer table.

Run on the GPU machine (one call, one card):
    PYTHONPATH=. python3 benchmarks/lightning_attention.py [--out DIR] [--quick] [--no-tune] [--fast]
It checks the Pallas kernels against the float32 recurrence (outputs, final state, every gradient,
packed rows, an initial state, a ragged length), tunes the chunk-parallel forward and (unless --fast)
the sweeps, then times at the issue's shapes: the forward three ways (chunk-parallel kernels, the sweep
with segments, the sweep with one segment per row), the chunk kernels' states pass alone, forward+backward
through the default op, flash-linear-attention's chunk_simple_gla (when importable) and, unless --fast,
the chunked pure-JAX path and cuDNN causal softmax attention; then the one-token decode step. Prints a
table last; full logs go to --out. "ours" is what the op runs (pallas_attention.choose_forward_config).
Time it: with --fast the checks and tuning take ~95 s on an H200, and FLA's first call autotunes its
kernels for ~2 minutes (its autotune keys exclude T and H, so only once); --shapes picks a subset.

Counting: forward FLOPs = B*T*H*(4*C*D + 4*D^2) with C = 64 (intra-block QK^T and PV, inter-block
Q S and the state update), forward+backward = 3x that; softmax causal = 2*B*H*T^2*D forward.
Byte floors: forward reads q, k, v and writes o; forward+backward also reads do and writes dq, dk, dv;
decode reads q, k, v and the float32 state and writes o and the state.
"""
import argparse
import json
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.lightning_attention import lightning_attention, lightning_decode  # noqa: E402
from pallas_kernels.lightning_attention.chunk_kernel import ChunkConfig  # noqa: E402
from pallas_kernels.lightning_attention.pallas_attention import (choose_forward_config,  # noqa: E402
                                                                 pallas_lightning_attention)
from pallas_kernels.lightning_attention.pallas_decode import pallas_lightning_decode  # noqa: E402
from pallas_kernels.lightning_attention.reference import reference_lightning_attention  # noqa: E402
from pallas_kernels.lightning_attention.sweep_kernel import SweepConfig  # noqa: E402

SHAPES = [(1, 4096, 64, 128), (1, 16384, 64, 128), (1, 65536, 64, 128), (8, 8192, 8, 128), (8, 32768, 8, 128)]
TUNE_SHAPES = [(1, 16384, 64, 128), (8, 8192, 8, 128)]
DECODE_BATCHES = [1, 16, 256]
SWEEP_TUNE = [SweepConfig(64, 64, 4, 3, target_programs=0), SweepConfig(64, 64, 4, 3, 512),
              SweepConfig(64, 64, 4, 3, 1024), SweepConfig(64, 64, 4, 3, 2048), SweepConfig(64, 32, 4, 3, 1024),
              SweepConfig(64, 64, 8, 3, 1024), SweepConfig(64, 128, 8, 3, 1024), SweepConfig(128, 64, 8, 3, 1024),
              SweepConfig(64, 64, 4, 4, 1024)]
CHUNK_TUNE = [ChunkConfig(), ChunkConfig(chunk_blocks=2), ChunkConfig(chunk_blocks=8, states_num_stages=1),
              ChunkConfig(block_v=64), ChunkConfig(num_warps=8), ChunkConfig(num_stages=1),
              ChunkConfig(state_tile=32), ChunkConfig(states_num_stages=1), ChunkConfig(states_num_warps=8)]
SWEEP_FORWARDS = {"sweep": SweepConfig(), "sweep_1seg": SweepConfig(target_programs=0)}
DECODE_VARIANTS = [dict(block_v=32, num_warps=4), dict(block_v=64, num_warps=4), dict(block_v=128, num_warps=4),
                   dict(block_v=128, num_warps=8)]
LOG_PATH = os.path.join(os.environ.get("OUT", "."), "lightning_attention.log")


START = time.perf_counter()


def say(*parts):
    line = f"[{time.perf_counter() - START:4.0f}s] " + " ".join(str(p) for p in parts)
    print(line, flush=True)
    with open(LOG_PATH, "a") as f:
        f.write(line + "\n")


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def time_jax(fn, *args, budget_s=0.3):
    """Median seconds per call: back-to-back calls, one sync per batch, several batches."""
    out = fn(*args)
    jax.block_until_ready(out)
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = time.perf_counter() - start
    per_batch = max(1, min(50, int(budget_s / 5 / max(once, 1e-5))))
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(per_batch):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / per_batch)
    return statistics.median(samples)


def random_inputs(key, shape, dtype):
    batch, _, heads, head_dim = shape
    keys = jax.random.split(key, 5)
    q, k, v, do = (jax.random.normal(keys[i], shape, jnp.float32).astype(dtype) * 0.5 for i in range(4))
    slopes = 2.0 ** (-8.0 * (jnp.arange(heads, dtype=jnp.float32) + 1) / heads)
    return q, k, v, do, slopes


def correctness_cases(fast):
    """(dtype, head dim, packed, forward config or None for the default)."""
    if fast:
        return [(jnp.bfloat16, 128, True, None), (jnp.bfloat16, 64, False, None), (jnp.float32, 128, True, None),
                (jnp.float32, 64, False, None), (jnp.float32, 128, True, SweepConfig(target_programs=0))]
    return [(dtype, head_dim, packed, None) for dtype in (jnp.float32, jnp.bfloat16) for head_dim in (64, 128)
            for packed in (False, True)] + [(jnp.float32, 128, True, SweepConfig(target_programs=0))]


def check_correctness(cases, num_tokens=700, heads=4, decode_shape=(16, 64, 128)):
    say("== correctness: Pallas vs float32 recurrence (relative L2 error; forward default = "
        f"{choose_forward_config((2, num_tokens, heads, 128), jnp.bfloat16)})")
    worst = 0.0
    for dtype, head_dim, packed, config in cases:
        tol = 1e-4 if dtype == jnp.float32 else 1e-2
        shape = (2, num_tokens, heads, head_dim)
        key = jax.random.PRNGKey(head_dim + packed)
        q, k, v, do, slopes = random_inputs(key, shape, dtype)
        keys = jax.random.split(key, 3)
        state0 = jax.random.normal(keys[0], (2, heads, head_dim, head_dim), jnp.float32) * 0.1
        dfinal = jax.random.normal(keys[1], state0.shape, jnp.float32)
        segs = (jnp.cumsum(jax.random.bernoulli(keys[2], 0.01, shape[:2]), axis=1).astype(jnp.int32)
                if packed else None)

        def loss(fn):
            def f(q, k, v, slopes, s0):
                o, fin = fn(q, k, v, slopes, s0)
                return (jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)) + jnp.sum(fin * dfinal),
                        (o, fin))
            return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True))

        pallas_fn = loss(lambda q, k, v, s, s0: pallas_lightning_attention(
            q, k, v, s, initial_state=s0, segment_ids=segs, config=config))
        ref_fn = loss(lambda q, k, v, s, s0: reference_lightning_attention(
            q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), s,
            initial_state=s0, segment_ids=segs))
        try:
            (_, (o, fin)), grads = pallas_fn(q, k, v, slopes, state0)
        except Exception as err:
            say(f"  {jnp.dtype(dtype).name} D={head_dim} packed={packed} {config}: crashed: "
                f"{type(err).__name__}: {str(err)[:400]}")
            worst = float("inf")
            continue
        with jax.default_matmul_precision("highest"):
            (_, (ro, rfin)), rgrads = ref_fn(q, k, v, slopes, state0)
        errs = {"o": rel_err(o, ro), "final": rel_err(fin, rfin)}
        errs.update({n: rel_err(g, r) for n, g, r in zip(("dq", "dk", "dv", "dslopes", "dS0"), grads, rgrads)})
        worst = max(worst, max(errs.values()) / tol)
        say(f"  {jnp.dtype(dtype).name:8s} D={head_dim:3d} packed={packed!s:5s} tol={tol:g} "
            f"fwd={'default' if config is None else config} " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()))
    batch, heads, head_dim = decode_shape
    q, k, v, _, slopes = random_inputs(jax.random.PRNGKey(7), (batch, 1, heads, head_dim), jnp.bfloat16)
    state = jax.random.normal(jax.random.PRNGKey(8), (batch, heads, head_dim, head_dim), jnp.float32)
    o, new = lightning_decode(q[:, 0], k[:, 0], v[:, 0], slopes, state, impl="pallas")
    ro, rnew = lightning_decode(q[:, 0], k[:, 0], v[:, 0], slopes, state, impl="jnp")
    say(f"  decode bf16 B={batch}: o={rel_err(o, ro):.1e} state={rel_err(new, rnew):.1e}")
    say(f"  worst error / tolerance = {worst:.2f} ({'PASS' if worst <= 1 else 'FAIL'})")
    return worst <= 1


def forward_fn(slopes, config, backward_config=None):
    return lambda q, k, v: pallas_lightning_attention(q, k, v, slopes, config=config,
                                                      backward_config=backward_config)[0]


def fwd_bwd_fn(f):
    return jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))


def tune(shapes, configs, with_backward):
    """ms per tiling: forward (and forward+backward with the same sweep tiling when with_backward).
    Returns the tiling with the least summed forward time (and the one with the least backward time)."""
    say(f"== tuning {type(configs[0]).__name__}: ms forward" + (" | forward+backward" if with_backward else ""))
    results = {}
    for shape in shapes:
        q, k, v, do, slopes = random_inputs(jax.random.PRNGKey(1), shape, jnp.bfloat16)
        for cfg in configs:
            f = forward_fn(slopes, cfg)
            try:
                fwd = time_jax(jax.jit(f), q, k, v)
                both = time_jax(fwd_bwd_fn(f), q, k, v, do) if with_backward else fwd
            except Exception as err:  # a tiling Triton cannot compile: report it, keep going
                say(f"  {shape} {cfg}: failed: {type(err).__name__}: {str(err)[:200]}")
                fwd = both = float("inf")
            results.setdefault(cfg, []).append((fwd * 1e3, both * 1e3))
            say(f"  {shape} {cfg}: {fwd * 1e3:.3f}" + (f" | {both * 1e3:.3f}" if with_backward else ""))
    best_fwd = min(results, key=lambda c: sum(r[0] for r in results[c]))
    best_bwd = min(results, key=lambda c: sum(r[1] - r[0] for r in results[c]))
    say(f"  best forward {best_fwd}" + (f"; best backward {best_bwd}" if with_backward else ""))
    return best_fwd, best_bwd


def time_decode(batch, impl, steps=20, **kernel_args):
    """Seconds per decode step, from `steps` steps chained inside one jit (no dispatch gaps)."""
    q, k, v, _, slopes = random_inputs(jax.random.PRNGKey(3), (batch, steps, 64, 128), jnp.bfloat16)
    state = jax.random.normal(jax.random.PRNGKey(4), (batch, 64, 128, 128), jnp.float32)

    def one(t, carry):
        state, acc = carry
        args = (q[:, t], k[:, t], v[:, t], slopes, state)
        o, state = (pallas_lightning_decode(*args, **kernel_args) if impl == "kernel"
                    else lightning_decode(*args, impl=impl))
        return state, acc + o[:, 0, 0].astype(jnp.float32)

    run = jax.jit(lambda state: jax.lax.fori_loop(0, steps, one, (state, jnp.zeros((batch,), jnp.float32))))
    return time_jax(run, state) / steps


def load_fla():
    try:
        import torch
        from fla.ops.simple_gla import chunk_simple_gla
        return torch, chunk_simple_gla
    except Exception as err:
        say(f"flash-linear-attention unavailable: {type(err).__name__}: {err}")
        return None, None


def time_torch(fn):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


def peers(torch, chunk_simple_gla, slopes, q, k, v, do):
    """FLA forward, forward+backward and its output's first 256 tokens, in seconds."""
    out = {}
    if torch is None:
        return out
    tq, tk, tv, tdo = (torch.from_dlpack(x).requires_grad_(True) for x in (q, k, v, do))
    g_gamma = -torch.from_dlpack(slopes)
    tdo.requires_grad_(False)
    fwd = lambda: chunk_simple_gla(tq, tk, tv, g_gamma=g_gamma, scale=1.0)[0]
    out["fla_fwd"] = time_torch(fwd)

    def fwd_bwd():
        o = fwd()
        o.backward(tdo)
    out["fla_fwdbwd"] = time_torch(fwd_bwd)
    out["fla_o"] = np.asarray(jnp.from_dlpack(fwd().detach()).astype(jnp.float32)[:, :256])
    del tq, tk, tv, tdo
    torch.cuda.empty_cache()
    return out


def measure(row, name, fn, *args, **kwargs):
    try:
        row[name] = time_jax(fn, *args, **kwargs)
    except Exception as err:
        say(f"  {row['shape']} {name} failed: {type(err).__name__}: {str(err)[:300]}")


def bench(chunk_config, sweep_config, backward_config, shapes, fast):
    torch, chunk_simple_gla = load_fla()
    rows = []
    copy_src = jnp.ones((1 << 28,), jnp.float32)
    bandwidth = 2 * copy_src.nbytes / time_jax(jax.jit(lambda x: x * 1.0001), copy_src)
    del copy_src
    a = jax.random.normal(jax.random.PRNGKey(0), (8192, 8192), jnp.bfloat16)
    matmul = 2 * 8192 ** 3 / time_jax(jax.jit(lambda x: x @ x), a)
    del a
    say(f"== ceilings: copy {bandwidth / 1e12:.2f} TB/s (read+write), bf16 matmul {matmul / 1e12:.0f} TFLOP/s")
    say(f"== forwards: chunk {chunk_config}; sweeps {dict(SWEEP_FORWARDS, sweep=sweep_config)}; "
        f"backward {backward_config}")
    for shape in shapes:
        batch, tokens, heads, head_dim = shape
        q, k, v, do, slopes = random_inputs(jax.random.PRNGKey(2), shape, jnp.bfloat16)
        unit = q.nbytes
        row = {"shape": shape, "flops": batch * tokens * heads * (4 * 64 * head_dim + 4 * head_dim ** 2),
               "fwd_floor": 4 * unit / bandwidth, "fwdbwd_floor": 11 * unit / bandwidth}
        measure(row, "chunk_fwd", jax.jit(forward_fn(slopes, chunk_config)), q, k, v)
        states_only = lambda q, k, v: pallas_lightning_attention(q, k, v, slopes, config=chunk_config)[1]
        measure(row, "states_fwd", jax.jit(states_only), q, k, v)
        forwards = dict(SWEEP_FORWARDS, sweep=sweep_config)
        for name, cfg in forwards.items():
            measure(row, f"{name}_fwd", jax.jit(forward_fn(slopes, cfg)), q, k, v)
        shipped = choose_forward_config(shape, jnp.bfloat16)  # what the op runs: "ours"
        same = {chunk_config: "chunk_fwd", **{cfg: f"{name}_fwd" for name, cfg in forwards.items()}}.get(shipped)
        ours_fn = forward_fn(slopes, shipped, backward_config)
        if same in row:
            row["ours_fwd"] = row[same]
        else:
            measure(row, "ours_fwd", jax.jit(ours_fn), q, k, v)
        measure(row, "ours_fwdbwd", fwd_bwd_fn(ours_fn), q, k, v, do)
        try:
            ours = np.asarray(jax.jit(ours_fn)(q, k, v)[:, :256].astype(jnp.float32))
            fla = peers(torch, chunk_simple_gla, slopes, q, k, v, do)
            if "fla_o" in fla:
                say(f"  {shape}: ours vs FLA on the first 256 tokens: rel err {rel_err(ours, fla.pop('fla_o')):.1e}")
            row.update(fla)
        except Exception as err:
            say(f"  {shape} FLA failed: {type(err).__name__}: {str(err)[:300]}")
        if not fast:
            f = jax.jit(lambda q, k, v: lightning_attention(q, k, v, slopes, impl="chunked"))
            measure(row, "chunked_fwd", f, q, k, v)
            measure(row, "chunked_fwdbwd", fwd_bwd_fn(f), q, k, v, do)
            sdpa = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                        implementation="cudnn"))
            measure(row, "cudnn_fwd", sdpa, q, k, v, budget_s=0.5)
            if tokens <= 16384:
                measure(row, "cudnn_fwdbwd", fwd_bwd_fn(sdpa), q, k, v, do, budget_s=0.5)
        rows.append(row)
        say(f"  {shape}: " + " ".join(f"{n}={row[n] * 1e3:.3f}ms" for n in row if n.endswith(("fwd", "fwdbwd"))))
        del q, k, v, do

    decode_rows = []
    for batch in DECODE_BATCHES:
        nbytes = 2 * batch * 64 * 128 * 128 * 4 + 4 * batch * 64 * 128 * 2
        row = {"batch": batch, "floor": nbytes / bandwidth}
        for impl in ("auto", "jnp", "pallas"):
            row[impl] = time_decode(batch, impl)
        for variant in ([] if fast else DECODE_VARIANTS):
            row[f"kernel bv={variant['block_v']} w={variant['num_warps']}"] = time_decode(batch, "kernel", **variant)
        decode_rows.append(row)
        say(f"  decode B={batch}: " + " ".join(f"{n}={t * 1e3:.4f}ms" for n, t in row.items() if n != "batch"))
    return rows, decode_rows, bandwidth, matmul


def table(rows, decode_rows, bandwidth, matmul):
    ms = lambda x: f"{x * 1e3:7.3f}" if x else "      -"
    ratio = lambda a, b: f"{a / b:5.2f}" if a and b else "    -"
    say(f"\n== lightning attention, bf16, {jax.devices()[0].device_kind}; copy {bandwidth / 1e12:.2f} TB/s, "
        f"matmul {matmul / 1e12:.0f} TFLOP/s")
    say("shape (B,T,H,D)      | fwd: chunk (states) sweep sweep1seg  ours |  FLA  | FLA/chunk FLA/sweep FLA/ours | "
        "f+b: ours   FLA FLA/ours | ours TFLOP/s, % floor fwd f+b | chunked JAX fwd f+b | cuDNN fwd f+b")
    for r in rows:
        g = r.get
        tflops = r["flops"] / g("ours_fwd") / 1e12 if g("ours_fwd") else 0
        floor_f = 100 * r["fwd_floor"] / g("ours_fwd") if g("ours_fwd") else 0
        floor_b = 100 * r["fwdbwd_floor"] / g("ours_fwdbwd") if g("ours_fwdbwd") else 0
        say(f"{str(r['shape']):20s} | {ms(g('chunk_fwd'))} ({ms(g('states_fwd'))}) {ms(g('sweep_fwd'))} "
            f"{ms(g('sweep_1seg_fwd'))} {ms(g('ours_fwd'))} | {ms(g('fla_fwd'))} | "
            f"{ratio(g('fla_fwd'), g('chunk_fwd'))} {ratio(g('fla_fwd'), g('sweep_fwd'))} "
            f"{ratio(g('fla_fwd'), g('ours_fwd'))} | {ms(g('ours_fwdbwd'))} "
            f"{ms(g('fla_fwdbwd'))} {ratio(g('fla_fwdbwd'), g('ours_fwdbwd'))} | "
            f"{tflops:5.1f} {floor_f:4.0f}% {floor_b:4.0f}% | "
            f"{ms(g('chunked_fwd'))} {ms(g('chunked_fwdbwd'))} | {ms(g('cudnn_fwd'))} {ms(g('cudnn_fwdbwd'))}")
    say("decode step, H=64 D=128, float32 state (ms per step, GB/s against the byte floor):")
    for r in decode_rows:
        say(f"  B={r['batch']:4d} floor {ms(r['floor'])} | " + " | ".join(
            f"{n} {ms(t)} {r['floor'] * bandwidth / t / 1e9:6.0f}" for n, t in r.items()
            if n not in ("batch", "floor")))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.dirname(LOG_PATH))
    parser.add_argument("--quick", action="store_true", help="two shapes only")
    parser.add_argument("--no-tune", action="store_true", help="use the default tilings")
    parser.add_argument("--shapes", default=None, help="comma-separated indices into SHAPES (default: all)")
    parser.add_argument("--fast", action="store_true",
                        help="fewer correctness cases, no sweep tuning, no chunked JAX / cuDNN, default decode only")
    args = parser.parse_args()
    say(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    try:
        ok = check_correctness(correctness_cases(args.fast))
    except Exception as err:
        say(f"correctness check crashed: {type(err).__name__}: {err}")
        traceback.print_exc()
        ok = False
    chunk_config = choose_forward_config(SHAPES[0], jnp.bfloat16)
    sweep_config = backward_config = SweepConfig()
    if not args.no_tune:
        chunk_config, _ = tune(TUNE_SHAPES, CHUNK_TUNE, with_backward=False)
        if not args.fast:
            sweep_config, backward_config = tune(TUNE_SHAPES, SWEEP_TUNE, with_backward=True)
    shapes = SHAPES[:2] if args.quick else SHAPES
    if args.shapes:
        shapes = [SHAPES[int(i)] for i in args.shapes.split(",")]
    rows, decode_rows, bandwidth, matmul = bench(chunk_config, sweep_config, backward_config, shapes, args.fast)
    table(rows, decode_rows, bandwidth, matmul)
    with open(os.path.join(args.out, "lightning_attention.json"), "w") as f:
        json.dump({"rows": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()} for r in rows],
                   "decode": decode_rows, "bandwidth": bandwidth, "matmul": matmul,
                   "chunk": str(chunk_config), "sweep": str(sweep_config), "backward": str(backward_config)},
                  f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        raise
