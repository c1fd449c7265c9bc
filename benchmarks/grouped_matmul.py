"""Grouped matmul on one GPU: the Pallas kernels against ragged_dot and a balanced dense einsum.

    PYTHONPATH=. python3 benchmarks/grouped_matmul.py            # on the GPU machine (one call)
    PYTHONPATH=. python3 benchmarks/grouped_matmul.py --smoke    # tiny shapes, interpret mode, any machine
    PYTHONPATH=. python3 benchmarks/grouped_matmul.py --quick --widths 1b-up --candidates 128x256x64/8/3,128x128x64/4/3

--candidates: tilings for the per-kernel sweep, BMxBNxBK/warps/stages (Triton) or mosaic:BMxBNxBK/stages (the Mosaic
GPU kernels, pallas_kernels/grouped_matmul/mosaic_*.py; each kernel's tiles named after its own GEMM). Each kernel's
best candidate goes into the "best swept tiling" plan, so a faster Mosaic kernel shows in its forward+backward row.
--quick: the sweep, the dense einsum and the Pallas default and best plans only (no aligned schedule, ragged_dot or
jax's Mosaic GPU peers).

Checks correctness on the device first (vs the float32 reference on upcast inputs), then sweeps tilings of
each kernel, then times every variant at M1 width (16384 rows = 8192 tokens x top-2, K 6144, N 9216, 32
experts), research width (32768 rows, K 2048, N 1408, 32 experts) and research-1b's expert matmuls (65536 rows = 4 x
8192 tokens x top-2, hidden 2048, expert width 512: "1b-up" and "1b-down") for uniform, random and skewed routing.
Peers in the same run: jax.lax.ragged_dot (default lowering, and with
jax_ragged_dot_use_gpu_pallas_triton_lowering), jax's Mosaic GPU ragged_dot / transposed_ragged_dot
(jax.experimental.pallas.ops.gpu), and the balanced dense einsum (E, M/E, K) x (E, K, N), the upper bound.
Writes JSON lines to $OUT/grouped_matmul.jsonl (or ./grouped_matmul.jsonl) as it goes; prints a table last.
"""
import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import json_logger, parse_tiling, rel_err, tiling_spec, timed
from pallas_kernels.grouped_matmul import Tiling, TilingPlan, default_tiling, grouped_matmul
from pallas_kernels.grouped_matmul.kernel import SCHEDULES, group_bounds
from pallas_kernels.grouped_matmul.ops import d_rhs_kernel, grouped_kernel

WIDTHS = {"m1": (16384, 6144, 9216, 32), "research": (32768, 2048, 1408, 32),
          "1b-up": (65536, 2048, 512, 32), "1b-down": (65536, 512, 2048, 32)}
DEFAULT_WIDTHS = ("m1", "research")
SMOKE_WIDTHS = {"smoke": (300, 64, 48, 4), "smoke-wide": (300, 128, 128, 4)}  # -wide: K, N that Mosaic tiles divide
CANDIDATES = [Tiling(128, 256, 64, 8, 3), Tiling(128, 256, 64, 8, 4), Tiling(256, 128, 64, 8, 3),
              Tiling(128, 256, 128, 8, 2)]
FAST = dict(reps=10, inner=10)  # 10 x (10 back-to-back calls, one sync): host dispatch stays hidden
SLOW = dict(reps=2, inner=1)  # ragged_dot: 50-500 ms a call
LOG_PATH = os.path.join(os.environ.get("OUT", "."), "grouped_matmul.jsonl")
FAILURES = []


log = json_logger(LOG_PATH)


def routing_sizes(kind, rows, experts, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "uniform":  # exactly rows / E each: groups align with 128-row tiles
        return np.full(experts, rows // experts, np.int32)
    probs = np.ones(experts) if kind == "random" else np.exp(rng.normal(0.0, 1.0, experts))  # skewed: lognormal
    return rng.multinomial(rows, probs / probs.sum()).astype(np.int32)


def check_correctness(interpret):
    """Small uneven problem with empty groups and padding rows, every kernel, bf16 and float32."""
    sizes = np.array([0, 200, 0, 77, 300, 1, 0, 150], np.int32)  # sum 728 < M = 1000
    m, k, n = 1000, 320, 200
    for dtype in (jnp.bfloat16, jnp.float32):
        keys = jax.random.split(jax.random.PRNGKey(1), 3)
        lhs = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
        rhs = jax.random.normal(keys[1], (len(sizes), k, n), jnp.float32).astype(dtype)
        d_out = jax.random.normal(keys[2], (m, n), jnp.float32).astype(dtype)
        gs = jnp.asarray(sizes)

        def both(impl, a, b):
            out, vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, gs, impl=impl, interpret=interpret), a, b)
            return (out, *vjp(d_out.astype(a.dtype)))
        got = both("pallas", lhs, rhs)
        want = both("reference", lhs.astype(jnp.float32), rhs.astype(jnp.float32))
        for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, want):
            err = rel_err(g, w)
            finite = bool(np.isfinite(np.asarray(g, np.float32)).all())
            log(event="check", dtype=jnp.dtype(dtype).name, tensor=name, rel_err=err, finite=finite)
            if not finite or err > (2e-2 if dtype == jnp.bfloat16 else 1e-4):
                FAILURES.append(f"correctness: {jnp.dtype(dtype).name} {name} rel_err {err:.2e} finite {finite}")


def tile_work(sizes, rows, block_m, schedule):
    """Passes over K that the grouped kernel makes per row tile of the balanced case (1.0 = no waste)."""
    starts, ends = group_bounds(jnp.asarray(sizes), rows)
    _, _, lo, hi = SCHEDULES[schedule](starts, ends, rows, block_m)
    nonempty = np.asarray(ends > starts)
    visits = sum(int(nonempty[int(a):int(b)].sum()) for a, b in zip(lo, hi))
    return visits / -(-rows // block_m)


def operands(rows, k, n, experts, dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    lhs = jax.random.normal(keys[0], (rows, k), jnp.float32).astype(dtype)
    rhs = (jax.random.normal(keys[1], (experts, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    d_out = jax.random.normal(keys[2], (rows, n), jnp.float32).astype(dtype)
    return lhs, rhs, d_out


def fwd_bwd(forward):
    def run(lhs, rhs, gs, d_out):
        out, vjp = jax.vjp(lambda a, b: forward(a, b, gs), lhs, rhs)
        return (out, *vjp(d_out))
    return jax.jit(run)


def sweep(width, rows, k, n, experts, gs, lhs, rhs, d_out, interpret, timing, candidates, sweep_table):
    """Each kernel alone, each candidate tiling; returns the best TilingPlan."""
    flops = 2.0 * rows * k * n
    kernels = {
        "forward": lambda t: jax.jit(lambda a, b, g: grouped_kernel(a, b, g, t, interpret=interpret)),
        "d_lhs": lambda t: jax.jit(lambda a, b, g: grouped_kernel(a, b, g, t, transpose_w=True, interpret=interpret)),
        "d_rhs": lambda t: jax.jit(lambda a, b, g: d_rhs_kernel(a, b, g, t, out_dtype=b.dtype, interpret=interpret)),
    }
    args = {"forward": (lhs, rhs, gs), "d_lhs": (d_out, rhs, gs), "d_rhs": (lhs, d_out, gs)}
    best = {}
    for name, make in kernels.items():
        first = None
        for tiling in candidates:
            try:
                out = make(tiling)(*args[name])
                first = out if first is None else first
                err = rel_err(out, first)
                seconds = timed(make(tiling), *args[name], **timing)
            except Exception as error:  # a tiling that does not fit (shared memory) is skipped, not fatal
                log(event="sweep", width=width, kernel=name, tiling=tiling_spec(tiling), error=repr(error)[:300])
                continue
            log(event="sweep", width=width, kernel=name, tiling=tiling_spec(tiling), ms=seconds * 1e3,
                tflops=flops / seconds / 1e12, rel_diff_vs_first=err)
            sweep_table.append((width, name, tiling, seconds * 1e3, flops / seconds / 1e12, err))
            if err > 1e-2:
                FAILURES.append(f"sweep {width} {name} {tiling}: rel diff {err:.2e} vs the first candidate")
                continue
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, tiling)
    return TilingPlan(best["forward"][1], best["d_lhs"][1], best["d_rhs"][1])


def mgpu_peers(k, n):
    """jax's Mosaic GPU (Hopper wgmma) ragged_dot and transposed_ragged_dot, if they build here."""
    from jax.experimental.pallas.ops.gpu.ragged_dot_mgpu import ragged_dot
    from jax.experimental.pallas.ops.gpu.transposed_ragged_dot_mgpu import transposed_ragged_dot
    grid_block_n = 8 if n % (8 * 128) == 0 else 1
    cfg = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=grid_block_n)
    forward = jax.jit(lambda a, b, g: ragged_dot(a, b, group_sizes=g, **cfg))
    d_rhs = jax.jit(lambda a, y, g: transposed_ragged_dot(a, y, group_sizes=g, **cfg))
    return forward, d_rhs


def run_width(width, rows, k, n, experts, interpret, smoke, table, candidates, quick, sweep_table):
    timing = dict(reps=3, inner=1) if smoke else FAST
    slow = dict(reps=1, inner=1) if smoke else SLOW
    flops = 2.0 * rows * k * n
    lhs, rhs, d_out = operands(rows, k, n, experts)
    uniform = jnp.asarray(routing_sizes("uniform", rows, experts))
    plan = sweep(width, rows, k, n, experts, uniform, lhs, rhs, d_out, interpret, timing, candidates, sweep_table)
    log(event="best_plan", width=width, plan=str(plan))

    def add(routing, variant, fwd_s=None, both_s=None, note=""):
        table.append((width, routing, variant, fwd_s, both_s, note))
        log(event="time", width=width, routing=routing, variant=variant, fwd_ms=fwd_s and fwd_s * 1e3,
            fwd_bwd_ms=both_s and both_s * 1e3, note=note, flops_fwd=flops)

    # Upper bound: the same FLOPs as E equal dense matmuls.
    per = rows // experts
    dense = lambda a, b, g: jnp.einsum("egk,ekn->egn", a.reshape(experts, per, k), b).reshape(rows, n)
    add("balanced", "dense einsum", timed(jax.jit(dense), lhs, rhs, uniform, **timing),
        timed(fwd_bwd(dense), lhs, rhs, uniform, d_out, **timing))

    default = default_tiling(lhs.dtype, rows, experts)  # what the op runs with no tiling given
    mosaic = default_tiling(lhs.dtype, rows, experts, k, n, hopper=False if interpret else None)  # where it divides
    aligned = TilingPlan(*(dataclasses.replace(t, schedule="aligned") for t in default))
    variants = [("pallas (default tiling)", default)] + ([] if quick else [("pallas (aligned schedule)", aligned)])
    if mosaic != default:
        variants.append(("pallas (Mosaic GPU where it divides)", mosaic))
    if plan != default:
        variants.append(("pallas (best swept tiling)", plan))
    for routing in ("uniform", "random", "skewed"):
        gs = jnp.asarray(routing_sizes(routing, rows, experts))
        for label, tiling in variants:
            op = lambda a, b, g, t=tiling: grouped_matmul(a, b, g, impl="pallas", interpret=interpret, tiling=t)
            work = tile_work(gs, rows, tiling.forward.block_m, getattr(tiling.forward, "schedule", "group"))
            add(routing, label, timed(jax.jit(op), lhs, rhs, gs, **timing),
                timed(fwd_bwd(op), lhs, rhs, gs, d_out, **timing),
                note=f"max group {int(gs.max())}, K passes per tile {work:.3f}")
        if routing == "random" or quick:
            continue  # the slow peers: uniform and skewed only
        ragged = lambda a, b, g: grouped_matmul(a, b, g, impl="ragged_dot")
        add(routing, "ragged_dot", timed(jax.jit(ragged), lhs, rhs, gs, **slow),
            timed(fwd_bwd(ragged), lhs, rhs, gs, d_out, **slow))
        if smoke:
            continue
        try:
            jax.config.update("jax_ragged_dot_use_gpu_pallas_triton_lowering", True)
            add(routing, "ragged_dot (pallas triton lowering)", timed(jax.jit(ragged), lhs, rhs, gs, **slow),
                timed(fwd_bwd(ragged), lhs, rhs, gs, d_out, **slow))
        except Exception as error:
            add(routing, "ragged_dot (pallas triton lowering)", note=f"failed: {repr(error)[:120]}")
        finally:
            jax.config.update("jax_ragged_dot_use_gpu_pallas_triton_lowering", False)
        if routing != "uniform":
            continue  # jax's Mosaic GPU kernels: uniform routing only (skewed measured on 2026-11-26, run 1)
        try:
            mgpu_fwd, mgpu_drhs = mgpu_peers(k, n)
            fwd_s = timed(mgpu_fwd, lhs, rhs, gs, **timing)
            drhs_s = timed(mgpu_drhs, lhs, d_out, gs, **timing)
            err = rel_err(mgpu_fwd(lhs, rhs, gs)[:4096], grouped_matmul(lhs, rhs, gs, impl="pallas")[:4096])
            add(routing, "jax mosaic-gpu ragged_dot", fwd_s, note=f"d_rhs alone {drhs_s * 1e3:.2f} ms "
                f"({flops / drhs_s / 1e12:.0f} TFLOP/s); rel diff vs pallas {err:.1e}")
        except Exception as error:
            add(routing, "jax mosaic-gpu ragged_dot", note=f"failed: {repr(error)[:120]}")


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode (no GPU needed)")
    parser.add_argument("--widths", default=None, help=f"comma list of widths to run, of {sorted(WIDTHS)} "
                        f"(default: {','.join(DEFAULT_WIDTHS)})")
    parser.add_argument("--candidates", default=None, help="comma list of sweep tilings (see the module docstring)")
    parser.add_argument("--quick", action="store_true", help="no aligned schedule, ragged_dot or Mosaic GPU peers")
    args = parser.parse_args(argv)
    interpret = args.smoke
    widths = SMOKE_WIDTHS if args.smoke else {w: WIDTHS[w] for w in DEFAULT_WIDTHS}
    if args.widths:
        unknown = set(args.widths.split(",")) - set(WIDTHS) - set(SMOKE_WIDTHS)
        if unknown:
            parser.error(f"--widths: unknown {sorted(unknown)}; choose from {sorted(WIDTHS)}")
        widths = {w: {**WIDTHS, **SMOKE_WIDTHS}[w] for w in args.widths.split(",")}
    candidates = [parse_tiling(c) for c in args.candidates.split(",")] if args.candidates else CANDIDATES
    log(event="env", jax=jax.__version__, device=str(jax.devices()[0]), kind=jax.devices()[0].device_kind,
        date=time.strftime("%Y-%m-%d"))
    open(LOG_PATH, "w").close()
    check_correctness(interpret)
    if not args.smoke:
        a = jax.random.normal(jax.random.PRNGKey(3), (8192, 8192), jnp.bfloat16)
        seconds = timed(jax.jit(jnp.dot), a, a, **FAST)
        log(event="matmul_ceiling", shape="8192^3 bf16", tflops=2 * 8192**3 / seconds / 1e12)
        del a
    table, sweep_table = [], []
    for width, (rows, k, n, experts) in widths.items():
        run_width(width, rows, k, n, experts, interpret, args.smoke, table, candidates, args.quick, sweep_table)
    print(f"\n{'width':9} {'kernel':8} {'tiling (uniform routing)':24} {'ms':>8} {'TF/s':>5} {'rel diff':>9}")
    for width, name, tiling, ms, tflops, err in sweep_table:
        print(f"{width:9} {name:8} {tiling_spec(tiling):24} {ms:8.3f} {tflops:5.0f} {err:9.1e}")
    dense = {w: (f, b) for w, r, v, f, b, _ in table if v == "dense einsum"}
    print(f"\n{'width':9} {'routing':9} {'variant':37} {'fwd ms':>8} {'TF/s':>5} {'%dense':>6} "
          f"{'f+b ms':>8} {'TF/s':>5} {'%dense':>6}  note")
    for width, routing, variant, fwd_s, both_s, note in table:
        rows, k, n, _ = widths[width]
        flops = 2.0 * rows * k * n
        cells = []
        for seconds, mult, ref in ((fwd_s, 1, dense[width][0]), (both_s, 3, dense[width][1])):
            if seconds is None:
                cells.append(f"{'-':>8} {'-':>5} {'-':>6}")
            else:
                cells.append(f"{seconds * 1e3:8.2f} {mult * flops / seconds / 1e12:5.0f} {100 * ref / seconds:5.0f}%")
        print(f"{width:9} {routing:9} {variant:37} {cells[0]} {cells[1]}  {note}")
    for failure in FAILURES:
        print("FAILED", failure)
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
