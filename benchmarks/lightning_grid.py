"""Lightning attention forward (and forward+backward) against flash-linear-attention on a grid of shapes.

    PYTHONPATH=. python3 benchmarks/lightning_grid.py [--budget 240] [--shapes 0,1,4] [--fwdbwd 0,4] [--no-fla]
    PYTHONPATH=. python3 benchmarks/lightning_grid.py --smoke     # CPU, interpret=True, tiny shapes, no FLA
FLA is not installed on the GPU machine: `make card-wheels` here, carry .whl, and start the call with the install
line it prints (it holds fla-core and einops).

Per shape (B, T, H, D), bf16 q/k/v, float32 slopes 2^(-8(h+1)/H) (M1's): our forward under a few tilings --
"shipped" (what the op runs: pallas_attention.choose_forward_config), "chunk64" (chunk-parallel kernels with
64-token chunks, FLA's own chunk length: untried in benchmarks/notes_lightning.md), and the other family ("sweep"
where the chunk kernels ship, "chunk128" where the sweep does) -- then FLA's `chunk_simple_gla(q, k, v,
g_gamma=-slopes, scale=1.0)` (the same math). Forward+backward: ours as shipped (custom VJP, three backward sweeps)
against FLA's autograd, on the --fwdbwd shapes. Every candidate's output is checked against the shipped one and
FLA's against ours (first and last 256 tokens, relative L2).

Timing, the same for both sides: one warm-up call (compiles / autotunes), one timed call to size a batch of
back-to-back calls (~20 ms, 1-50 calls), then the median of 5 such batches, each closed by one sync
(jax.block_until_ready / torch.cuda.synchronize).

FLA autotunes each Triton kernel at its first call, over every config (~1-2 minutes for the forward kernels, about
as long again for the backward), with keys that leave out T, H and D: the first shape's choice serves the whole grid
(the grid starts with (1, 16K, 64, 128), the shape our chunk tiling was tuned at; D=64 shapes then run FLA on
configs tuned at D=128). --budget stops starting new measurements after that many seconds; the table (and the
minimum ratios, printed last) come from what was measured. Writes $OUT/lightning_grid.jsonl as it goes.
"""
import argparse
import json
import os
import statistics
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch (FLA) shares the card

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import rel_err  # noqa: E402
from pallas_kernels.lightning_attention.chunk_kernel import ChunkConfig  # noqa: E402
from pallas_kernels.lightning_attention.pallas_attention import (choose_forward_config,  # noqa: E402
                                                                 pallas_lightning_attention)
from pallas_kernels.lightning_attention.sweep_kernel import SweepConfig  # noqa: E402

# (B, T, H, D); B*T <= 256K tokens. First: the shape FLA autotunes at (see the docstring).
GRID = [(1, 16384, 64, 128), (16, 1000, 64, 128), (4, 4099, 64, 128), (1, 131072, 64, 128), (4, 8192, 16, 128),
        (16, 2048, 8, 128), (16, 1000, 64, 64), (16, 4099, 8, 64), (1, 16384, 64, 64), (2, 131072, 8, 64),
        (16, 1000, 8, 64), (64, 512, 16, 64), (4, 1023, 32, 64), (8, 2047, 32, 64)]
FWDBWD = (0, 4)  # indices into GRID timed forward+backward by default: M1's heads at 16K, research-1b's training
MISMATCH = 2e-2  # relative error between bf16 outputs above which a row is flagged (observed: 2-3e-3)
SMOKE_GRID = [(2, 100, 2, 64), (1, 200, 2, 128)]
OUT = os.environ.get("OUT", ".")
START = time.perf_counter()


def say(*parts):
    print(f"[{time.perf_counter() - START:5.0f}s] " + " ".join(str(p) for p in parts), flush=True)


def bench(call, sync, reps=5, batch_seconds=0.02, max_inner=50):
    """Median seconds per call (the method in the module docstring); the same for JAX and torch."""
    sync(call())
    start = time.perf_counter()
    sync(call())
    once = time.perf_counter() - start
    inner = max(1, min(max_inner, int(batch_seconds / max(once, 1e-6))))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            out = call()
        sync(out)
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def candidates(shape):
    """name -> forward config: shipped, chunk64, and the other family; duplicates dropped."""
    shipped = choose_forward_config(shape, jnp.bfloat16)
    other = ("sweep", SweepConfig()) if isinstance(shipped, ChunkConfig) else ("chunk128", ChunkConfig())
    out = {"shipped": shipped}
    for name, cfg in (("chunk64", ChunkConfig(chunk_blocks=1)), other):
        if cfg not in out.values():
            out[name] = cfg
    return out


def describe(cfg):
    if isinstance(cfg, ChunkConfig):
        return f"chunk{cfg.block * cfg.chunk_blocks}"
    return f"sweep(target_programs={cfg.target_programs})"


def inputs(shape, seed=0):
    batch, _, heads, _ = shape
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k, v, do = (jax.random.normal(keys[i], shape, jnp.float32).astype(jnp.bfloat16) * 0.5 for i in range(4))
    slopes = 2.0 ** (-8.0 * (jnp.arange(heads, dtype=jnp.float32) + 1) / heads)
    return jax.block_until_ready((q, k, v, do, slopes))


def ends(x):
    """First and last 256 tokens as float64 (enough to check, cheap to copy)."""
    x = np.asarray(jnp.concatenate([x[:, :256], x[:, -256:]], axis=1).astype(jnp.float32))
    return x.astype(np.float64)


def load_fla():
    try:
        import torch
        from fla.ops.simple_gla import chunk_simple_gla
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no GPU")
        return torch, chunk_simple_gla
    except Exception as err:
        say(f"flash-linear-attention unavailable ({type(err).__name__}: {err}): timing ours only")
        return None, None


class Grid:
    def __init__(self, args):
        self.args = args
        self.rows = []
        self.path = os.path.join(OUT, "lightning_grid.jsonl")
        self.torch, self.fla = (None, None) if (args.no_fla or args.smoke) else load_fla()

    def over_budget(self):
        return time.perf_counter() - START > self.args.budget

    def log(self, row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def fwd_fn(self, slopes, cfg):
        interpret = self.args.smoke
        return jax.jit(lambda q, k, v: pallas_lightning_attention(q, k, v, slopes, config=cfg,
                                                                  interpret=interpret)[0])

    def forward(self, index, shape):
        row = {"shape": list(shape), "index": index, "ours_ms": {}, "errors": {}}
        self.rows.append(row)
        if self.over_budget():
            row["skipped"] = "budget"
            return
        q, k, v, do, slopes = inputs(shape)
        reps = 2 if self.args.smoke else 5
        reference = None
        for name, cfg in candidates(shape).items():
            if self.over_budget():
                row["errors"][name] = "skipped: budget"
                break
            try:
                f = self.fwd_fn(slopes, cfg)
                out = f(q, k, v)
                got = ends(out)
                del out
                if reference is None:
                    reference = got
                else:
                    row.setdefault("vs_shipped", {})[name] = rel_err(got, reference)
                row["ours_ms"][name] = 1e3 * bench(lambda: f(q, k, v), jax.block_until_ready, reps=reps)
                row.setdefault("configs", {})[name] = describe(cfg)
            except Exception as err:
                row["errors"][name] = f"{type(err).__name__}: {str(err)[:300]}"
        if row["ours_ms"]:
            best = min(row["ours_ms"], key=row["ours_ms"].get)
            row["best"], row["best_ms"] = best, row["ours_ms"][best]
        if self.fla is not None and not self.over_budget():
            def make_call():
                tq, tk, tv = (self.torch.from_dlpack(x) for x in (q, k, v))
                g_gamma = -self.torch.from_dlpack(slopes)
                call = lambda: self.fla(tq, tk, tv, g_gamma=g_gamma, scale=1.0)[0]  # noqa: E731
                if reference is not None:
                    fla_out = jnp.from_dlpack(call().detach().contiguous())
                    row["fla_vs_ours"] = rel_err(ends(fla_out), reference)
                    del fla_out
                return call
            self.time_fla(row, "fla", make_call, reps)
        if row.get("fla_ms") and row.get("best_ms"):
            row["ratio_best"] = row["fla_ms"] / row["best_ms"]
        if row.get("fla_ms") and row["ours_ms"].get("shipped"):
            row["ratio_shipped"] = row["fla_ms"] / row["ours_ms"]["shipped"]
        self.log(row)
        say(json.dumps(row))

    def time_fla(self, row: dict, key: str, make_call, reps: int) -> None:
        """row[key + "_ms"]: FLA's call (from make_call()) timed like ours; a failure is recorded, not raised."""
        try:
            call = make_call()
            row[key + "_ms"] = 1e3 * bench(call, lambda _: self.torch.cuda.synchronize(), reps=reps)
        except Exception as err:  # noqa: BLE001 - one shape's failure must not end the grid
            row["errors"][key] = f"{type(err).__name__}: {str(err)[:300]}"
        finally:
            self.torch.cuda.empty_cache()

    def fwdbwd(self, index, shape):
        row = next(r for r in self.rows if r["index"] == index)
        if self.over_budget():
            row["fwdbwd_skipped"] = "budget"
            return
        q, k, v, do, slopes = inputs(shape)
        reps = 2 if self.args.smoke else 5
        interpret = self.args.smoke
        try:
            f = lambda q, k, v: pallas_lightning_attention(q, k, v, slopes, interpret=interpret)[0]  # noqa: E731
            grad = jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))
            row["ours_fb_ms"] = 1e3 * bench(lambda: grad(q, k, v, do), jax.block_until_ready, reps=reps)
        except Exception as err:
            row["errors"]["ours_fb"] = f"{type(err).__name__}: {str(err)[:300]}"
        if self.fla is not None and not self.over_budget():
            def make_call():
                torch = self.torch
                tq, tk, tv = (torch.from_dlpack(x).requires_grad_(True) for x in (q, k, v))
                tdo = torch.from_dlpack(do)
                g_gamma = -torch.from_dlpack(slopes)

                def call():
                    o = self.fla(tq, tk, tv, g_gamma=g_gamma, scale=1.0)[0]
                    return torch.autograd.grad(o, (tq, tk, tv), tdo)
                return call
            self.time_fla(row, "fla_fb", make_call, reps)
        if row.get("fla_fb_ms") and row.get("ours_fb_ms"):
            row["ratio_fb"] = row["fla_fb_ms"] / row["ours_fb_ms"]
        self.log(row)
        say(json.dumps({k: row.get(k) for k in ("shape", "ours_fb_ms", "fla_fb_ms", "ratio_fb", "errors")}))


def table(grid):
    fmt = lambda x: f"{x:8.3f}" if isinstance(x, float) else f"{'-':>8s}"  # noqa: E731
    ratio = lambda x: f"{x:6.2f}" if isinstance(x, float) else f"{'-':>6s}"  # noqa: E731
    print(f"\n== lightning forward vs FLA chunk_simple_gla, bf16, {jax.devices()[0].device_kind}"
          + ("" if grid.fla is not None else "  (FLA not run: ours only)"))
    print(f"{'shape (B, T, H, D)':22s} {'shipped':>8s} {'chunk64':>8s} {'other':>8s} {'best':>9s} {'FLA':>8s} "
          f"{'FLA/best':>8s} {'FLA/ship':>8s} | {'f+b ours':>8s} {'f+b FLA':>8s} {'ratio':>6s} | notes")
    for r in grid.rows:
        ms = r["ours_ms"]
        other = next((ms[n] for n in ms if n not in ("shipped", "chunk64")), None)
        notes = "; ".join(f"{k}: {v[:60]}" for k, v in r["errors"].items())
        if r.get("skipped"):
            notes = "skipped (budget)"
        if "fla_vs_ours" in r:
            notes = f"FLA err {r['fla_vs_ours']:.1e} " + notes
        bad = [n for n, e in r.get("vs_shipped", {}).items() if e > MISMATCH]
        if bad or r.get("fla_vs_ours", 0) > MISMATCH:
            notes = f"MISMATCH ({', '.join(bad) or 'FLA'} vs shipped > {MISMATCH:g}) " + notes
        print(f"{str(tuple(r['shape'])):22s} {fmt(ms.get('shipped'))} {fmt(ms.get('chunk64'))} {fmt(other)} "
              f"{r.get('best', '-'):>9s} {fmt(r.get('fla_ms'))} {ratio(r.get('ratio_best'))}   "
              f"{ratio(r.get('ratio_shipped'))}   | {fmt(r.get('ours_fb_ms'))} {fmt(r.get('fla_fb_ms'))} "
              f"{ratio(r.get('ratio_fb'))} | {notes}")
    print("('other' = the kernel family that does not ship at this shape: sweep or chunk128; ms per call)")
    for key, label in (("ratio_best", "forward, best config"), ("ratio_shipped", "forward, shipped config"),
                       ("ratio_fb", "forward+backward")):
        values = [(r[key], tuple(r["shape"])) for r in grid.rows if isinstance(r.get(key), float)]
        if values:
            low = min(values)
            print(f"MIN FLA/ours {label}: {low[0]:.2f} at {low[1]} (over {len(values)} shapes)")
        else:
            print(f"MIN FLA/ours {label}: n/a (no FLA figure)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=None, help="comma indices into GRID (default: all)")
    parser.add_argument("--fwdbwd", default=",".join(map(str, FWDBWD)),
                        help="comma indices into GRID also timed forward+backward ('' for none)")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds after which no measurement starts")
    parser.add_argument("--extra", default="", help="more shapes, 'B,T,H,D;B,T,H,D': timed after --shapes")
    parser.add_argument("--no-fla", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU: interpret=True, tiny shapes, no FLA")
    args = parser.parse_args(argv)
    os.makedirs(OUT, exist_ok=True)
    shapes = list(SMOKE_GRID if args.smoke else GRID)
    chosen = list(range(len(shapes))) if not args.shapes else [int(i) for i in args.shapes.split(",")]
    for spec in filter(None, args.extra.split(";")):
        try:
            shape = tuple(int(v) for v in spec.split(","))
        except ValueError:
            parser.error(f"--extra: {spec!r} is not B,T,H,D")
        if len(shape) != 4:
            parser.error(f"--extra: {spec!r} is not B,T,H,D")
        chosen.append(len(shapes))
        shapes.append(shape)
    fb = [int(i) for i in args.fwdbwd.split(",") if i.strip()] if not args.smoke else [0]
    grid = Grid(args)
    say(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, FLA {'yes' if grid.fla else 'no'}, "
        f"budget {args.budget:.0f} s, shapes {[shapes[i] for i in chosen]}, f+b {[shapes[i] for i in fb]}")
    for i in chosen:
        try:
            grid.forward(i, shapes[i])
        except Exception as err:  # e.g. out of memory: the next shape still runs
            grid.rows.append({"shape": list(shapes[i]), "index": i, "ours_ms": {},
                              "errors": {"shape": f"{type(err).__name__}: {str(err)[:300]}"}})
            traceback.print_exc()
    for i in fb:
        if i in chosen:
            try:
                grid.fwdbwd(i, shapes[i])
            except Exception as err:
                say(f"f+b {shapes[i]} failed: {type(err).__name__}: {err}")
    table(grid)


if __name__ == "__main__":
    main()
