"""Decode latency on "hf-bench" at a 2K context (batch 1 unless --batch) under XLA flag sets and decode
implementation variants.

    PYTHONPATH=. python3 benchmarks/decode_flags.py [--variants default,cuda-graphs,...] [--steps 64] [--reps 5]
    PYTHONPATH=. python3 benchmarks/decode_flags.py --batch 64 --variants default,moe-argsort --rounds 3
    PYTHONPATH=. python3 benchmarks/decode_flags.py --smoke          # tiny model, 8 tokens, on the CPU

The measurement is benchmarks/inference.py's `ours_decode` (the engine: prefill the 2K prompt in each of --batch
rows, then one compiled while-loop of `--steps` decode steps; ms/token = decode time / steps, a step being one token
of every row; median over --reps runs after a warm-up), so "default" is the figure in benchmarks/RESULTS.md.
--synthetic times decode over a cache of random contents instead (`synthetic_decode`, the latency sweep's method:
no prefill to compile).

Each XLA flag set runs in its own subprocess (XLA reads XLA_FLAGS once, and aborts the process on a flag it refuses:
that is reported as the variant's error, the other variants go on). Code variants that share a flag set run in one
subprocess, with jax's caches and the engine's compiled steps cleared between them. Variants (VARIANTS):
  default                 the engine as shipped
  cuda-graphs             XLA command buffers for fusions, cuBLAS(Lt), custom calls, while and conditional,
                          graphs of any size (CMD_BUFFER_FLAGS): the whole decode while-loop can become one graph
  lightning-jnp           lightning_decode via XLA's fused jnp step instead of the Pallas kernel
  moe-gather              decode-sized MoE (<= 64 rows): gather each row's expert matrices, one batched matvec
                          (reads exactly the chosen experts' weights) instead of the Pallas grouped matmul
  moe-ragged-dot          decode-sized MoE through jax.lax.ragged_dot
  moe-two-calls           an expert's gate and up matmuls as two grouped-matmul calls and SwiGLU apart (the
                          default before 2026-12-01) instead of grouped_swiglu's one kernel for decode-sized calls
  moe-compare-sort        the MoE's pairs sorted by expert through comparisons (moe_core.COMPARE_SORT_MAX_PAIRS
                          = 256, the default since 2026-12-01) instead of a sort, a bincount and a scatter
  moe-argsort             the MoE's pairs sorted by jnp.argsort, a bincount and a scatter (COMPARE_SORT_MAX_PAIRS =
                          None: the default before 2026-12-01)
  moe-tiles-bn64/-bn32    decode-sized MoE through the Pallas grouped matmul with narrow tiles (block_m 16, block_n
                          64 or 32, block_k 256): more programs per call (benchmarks/grouped_matmul_decode.py)
  moe-split-k2/-k4        the small-row default tiles (16 x 64 x 128) with the K steps split over 2 or 4 programs
  bf16-lm-head            RunPolicy(float32_lm_head=False) (run-time policy: the same model)
  projection-one-row      the layers' projections of one row as XLA's own dot (the default before 2026-12-01; since
                          then m1jax.layers.projection runs one row as two, see its docstring)
  cuda-graphs+moe-gather  both
--flag-set NAME="--xla_..." adds a variant: the default engine under those flags (repeatable).
Writes $OUT/decode_flags.jsonl (one line per variant, as they finish); prints the table last.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CMD_BUFFER_FLAGS = ("--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,WHILE,CONDITIONAL "
                    "--xla_gpu_graph_min_graph_size=1")  # these names parse in jax 0.11.2's XLA (checked)
VARIANTS = {
    "default": dict(flags="", code={}),
    "cuda-graphs": dict(flags=CMD_BUFFER_FLAGS, code={}),
    "lightning-jnp": dict(flags="", code={"lightning_decode": "jnp"}),
    "moe-gather": dict(flags="", code={"moe": "gather"}),
    "moe-ragged-dot": dict(flags="", code={"moe": "ragged_dot"}),
    "moe-two-calls": dict(flags="", code={"moe": "two-calls"}),
    "moe-compare-sort": dict(flags="", code={"compare_sort": 256}),
    "moe-argsort": dict(flags="", code={"compare_sort": None}),
    "moe-tiles-bn64": dict(flags="", code={"moe": "tiles:16x64x256/4/4"}),
    "moe-tiles-bn32": dict(flags="", code={"moe": "tiles:16x32x256/2/4"}),
    "cuda-graphs+moe-tiles-bn64": dict(flags=CMD_BUFFER_FLAGS, code={"moe": "tiles:16x64x256/4/4"}),
    "moe-split-k2": dict(flags="", code={"moe": "tiles:16x64x128/4/4/2"}),
    "moe-split-k4": dict(flags="", code={"moe": "tiles:16x64x128/4/4/4"}),
    "bf16-lm-head": dict(flags="", code={"float32_lm_head": False}),
    "projection-one-row": dict(flags="", code={"projection": "dense"}),
    "cuda-graphs+moe-gather": dict(flags=CMD_BUFFER_FLAGS, code={"moe": "gather"}),
    "cuda-graphs+lightning-jnp": dict(flags=CMD_BUFFER_FLAGS, code={"lightning_decode": "jnp"}),
}
DEFAULT_VARIANTS = "default,cuda-graphs,lightning-jnp,moe-gather,bf16-lm-head,cuda-graphs+moe-gather"
DECODE_ROWS_MAX = 64  # the MoE variants replace the grouped matmul only for calls this small (decode steps)
OUT = os.environ.get("OUT", ".")


# ----- the worker: one process, one XLA_FLAGS, several code variants -----
def _decode_grouped_matmul(kind: str):
    """A GroupedMatmul for the MoE layer: `kind` for decode-sized calls, the default (Pallas on GPU) otherwise.
    kind "tiles:BMxBNxBK/warps/stages[/split_k]" is the Pallas grouped matmul (interpret mode on the CPU) with that
    Tiling (benchmarks.common.parse_tiling)."""
    import jax
    import jax.numpy as jnp

    from benchmarks.common import parse_tiling
    from m1jax.layers.moe_core import default_grouped_matmul
    from pallas_kernels.grouped_matmul import grouped_matmul
    fallback = default_grouped_matmul()

    def gather(lhs, rhs, group_sizes):
        rows = lhs.shape[0]
        ends = jnp.cumsum(group_sizes)
        index = jnp.arange(rows, dtype=ends.dtype)
        expert = jnp.minimum(jnp.searchsorted(ends, index, side="right"), rhs.shape[0] - 1)
        out = jnp.einsum("mk,mkn->mn", lhs, rhs[expert], preferred_element_type=jnp.float32)
        return jnp.where((index < ends[-1])[:, None], out, 0.0).astype(lhs.dtype)

    def ragged(lhs, rhs, group_sizes):
        return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32).astype(lhs.dtype)

    if kind.startswith("tiles:"):
        tiling = parse_tiling(kind.removeprefix("tiles:"))
        small = lambda lhs, rhs, group_sizes: grouped_matmul(lhs, rhs, group_sizes, impl="pallas", tiling=tiling,
                                                             interpret=jax.default_backend() != "gpu")
    elif kind == "two-calls":  # a plain function: expert_hidden finds no `swiglu` on it
        return lambda lhs, rhs, group_sizes: fallback(lhs, rhs, group_sizes)
    else:
        small = {"gather": gather, "ragged_dot": ragged}[kind]
    return lambda lhs, rhs, group_sizes: (small if lhs.shape[0] <= DECODE_ROWS_MAX else fallback)(lhs, rhs,
                                                                                                 group_sizes)


def worker(names: list[str], smoke: bool, context: int, steps: int, reps: int, synthetic: bool, rounds: int,
           batch: int) -> None:
    import flax.linen as nn
    import jax

    import benchmarks.inference as bench
    from benchmarks.common import config_for, policy_for, random_params
    from m1jax import M1ForCausalLM
    from m1jax.inference import engine
    from m1jax.layers import moe_core
    from m1jax.layers.projection import Projection
    from pallas_kernels.lightning_attention import ops as lightning_ops

    size = "smoke" if smoke else "hf-bench"
    config, policy = config_for(size), policy_for(size)
    params = random_params(config, policy=policy)
    rows_default = lightning_ops.DECODE_PALLAS_MAX_ROWS
    compare_default = moe_core.COMPARE_SORT_MAX_PAIRS
    projection_call = Projection.__call__
    for round_, name in [(r, name) for r in range(rounds) for name in names]:  # A B A B ...: no order bias
        code = VARIANTS[name]["code"]
        row = {"variant": name, "flags": os.environ.get("XLA_FLAGS", ""), "code": code, "round": round_,
               "device": jax.devices()[0].device_kind, "batch": batch, "context": context, "steps": steps,
               "reps": reps}
        begin = time.perf_counter()
        try:
            jax.clear_caches()  # a module-level switch below must not hit a trace cached under another setting
            engine._COMPILED.clear()
            lightning_ops.DECODE_PALLAS_MAX_ROWS = 0 if code.get("lightning_decode") == "jnp" else rows_default
            moe_core.COMPARE_SORT_MAX_PAIRS = code.get("compare_sort", compare_default)
            if code.get("projection") == "dense":
                Projection.__call__ = nn.Dense.__call__
            grouped_matmul = _decode_grouped_matmul(code["moe"]) if "moe" in code else None
            model = M1ForCausalLM(config, policy.replace(float32_lm_head=code.get("float32_lm_head",
                                                                                  policy.float32_lm_head)),
                                  grouped_matmul=grouped_matmul)
            if synthetic:  # a cache of random contents: no prefill to compile
                row.update(bench.synthetic_decode(model, params, context, steps, reps, batch), synthetic=True)
            else:
                row.update(bench.ours_decode(model, params, batch, context, steps, reps))
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err)[:600]}"
        finally:
            bench.M1ForCausalLM = M1ForCausalLM
            lightning_ops.DECODE_PALLAS_MAX_ROWS = rows_default
            moe_core.COMPARE_SORT_MAX_PAIRS = compare_default
            Projection.__call__ = projection_call
        row["seconds"] = time.perf_counter() - begin
        print("RESULT " + json.dumps(row), flush=True)


# ----- the parent: one subprocess per flag set -----
def run_group(flags: str, names: list[str], args, log) -> None:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--variants", ",".join(names),
           "--context", str(args.context), "--steps", str(args.steps), "--reps", str(args.reps),
           "--rounds", str(args.rounds), "--batch", str(args.batch)]
    cmd += [f"--flag-set={item}" for item in args.flag_set]
    cmd += ["--smoke"] * args.smoke + ["--synthetic"] * args.synthetic
    print(f"== XLA_FLAGS='{env['XLA_FLAGS']}': {', '.join(names)}", flush=True)
    done = set()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT)
        timer = threading.Timer(args.timeout, proc.kill)  # this process's own child, by its handle
        timer.start()
        try:
            for line in proc.stdout:
                if line.startswith("RESULT "):
                    row = json.loads(line[len("RESULT "):])
                    done.add(row["variant"])
                    log(row)
                else:
                    print("   | " + line.rstrip()[:300], flush=True)
            rc = proc.wait()
        finally:
            timer.cancel()
        err.seek(0)
        stderr = err.read()
    if rc != 0 or len(done) < len(names):
        lines = [x.strip() for x in stderr.splitlines() if x.strip()]
        key = [x for x in lines if re.search(r"Illegal value|Unknown flag|Check failed|Error|error:", x)]
        why = " | ".join((key or lines)[-4:])[-900:]
        reason = f"worker exit {rc}" + (" (killed at --timeout)" if rc in (-9, 137) else "") + f": {why}"
        for name in names:
            if name not in done:
                log({"variant": name, "flags": env["XLA_FLAGS"], "code": VARIANTS[name]["code"], "error": reason})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {sorted(VARIANTS)}")
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together (each step: one token of each)")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the code variants of a flag set this many times in turn (A B A B ...); the table "
                             "gives the median over rounds and their range (the GPU's first seconds run slower)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per subprocess (flag set)")
    parser.add_argument("--synthetic", action="store_true",
                        help="decode over a cache of random contents (inference.py's synthetic_decode): no prefill "
                             "compile per variant, a few seconds less each")
    parser.add_argument("--smoke", action="store_true", help="the tiny model on the CPU: context 40, 8 tokens")
    parser.add_argument("--flag-set", action="append", default=[], metavar="NAME=FLAGS",
                        help="an extra variant: the default engine under these XLA flags (repeatable)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for item in args.flag_set:
        name, _, flags = item.partition("=")
        VARIANTS[name.strip()] = dict(flags=flags.strip(), code={})
        if not args.worker:
            args.variants += "," + name.strip()
    for flag in ("batch", "context", "steps", "reps", "rounds"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.smoke:
        args.context, args.steps, args.reps = 40, 8, 1
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    if args.worker:
        worker(names, args.smoke, args.context, args.steps, args.reps, args.synthetic, args.rounds, args.batch)
        return 0

    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "decode_flags.jsonl")
    rows = []

    def log(row):
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        with open(path, "a") as f:
            f.write(line + "\n")

    groups: dict[str, list[str]] = {}
    for name in names:  # one subprocess per distinct flag set, in first-seen order
        groups.setdefault(VARIANTS[name]["flags"], []).append(name)
    start = time.perf_counter()
    for flags, members in groups.items():
        run_group(flags, members, args, log)
    runs: dict[str, list[float]] = {}
    errors: dict[str, str] = {}
    for r in rows:
        if "error" in r:
            errors[r["variant"]] = r["error"]
        else:
            runs.setdefault(r["variant"], []).append(r["ms_per_token"])
    base = statistics.median(runs["default"]) if "default" in runs else None
    print(f"\n== decode latency, batch {args.batch}, context {args.context}, {args.steps} steps, "
          f"median of {args.reps} "
          f"({'smoke config' if args.smoke else 'hf-bench'}; {time.perf_counter() - start:.0f} s in all)"
          + (f"; median over {args.rounds} rounds (range)" if args.rounds > 1 else ""))
    unit = "ms/token p50" if args.batch == 1 else "ms/step p50"  # a step: one token of each row
    print(f"{'variant':28s} {unit:>12s} {'range':>13s} {'tokens/s':>10s} {'vs default':>10s}  flags / error")
    for name in names:
        if name not in runs:
            print(f"{name:28s} {'failed':>12s} {'':>13s} {'':>10s} {'':>10s}  {errors.get(name, 'no result')[:200]}")
            continue
        ms = statistics.median(runs[name])
        spread = f"{min(runs[name]):.3f}-{max(runs[name]):.3f}"
        speed = f"{base / ms:.2f}x" if base else ""
        print(f"{name:28s} {ms:12.3f} {spread:>13s} {args.batch * 1e3 / ms:10.0f} {speed:>10s}  "
              f"{VARIANTS[name]['flags'][:80] or '-'}")
    return 0 if not errors and all(n in runs for n in names) else 1


if __name__ == "__main__":
    sys.exit(main())
