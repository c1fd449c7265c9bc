"""Lightning attention forward+backward under candidate tilings of the three backward sweeps, against FLA.

    PYTHONPATH=. python3 benchmarks/lightning_backward.py [--shapes 1,0,4] [--budget 420] [--no-fla]
    PYTHONPATH=. python3 benchmarks/lightning_backward.py --smoke      # CPU, interpret=True, tiny shapes, no FLA
FLA is not installed on the GPU machine: `make card-wheels` here, carry .whl, and start the call with the install
line it prints (it holds fla-core and einops).

The backward is three sweeps (pallas_attention._backward: dq forward over (do, v, k); dv, dk in reverse) run with
one SweepConfig. Per shape (B, T, H, D) of benchmarks/lightning_grid.GRID, bf16: ours forward+backward (the shipped
forward, `jax.vjp`) with each candidate backward tiling below, every candidate's dq, dk, dv checked against the
default tiling's (relative L2 over the whole tensors); then FLA's `chunk_simple_gla` forward+backward in the same
run (autograd). Timing as in lightning_grid.bench (median of 5 batches of back-to-back calls, one sync each).
The first shape gets every candidate; later shapes the default one and the three fastest at the first.
Writes $OUT/lightning_backward.jsonl as it goes and prints the table last.
"""
import argparse
import dataclasses
import json
import os
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch (FLA) shares the card

import jax  # noqa: E402

from benchmarks.common import rel_err  # noqa: E402
from benchmarks.lightning_grid import GRID, SMOKE_GRID, bench, inputs, load_fla  # noqa: E402
from pallas_kernels.lightning_attention.pallas_attention import (choose_forward_config,  # noqa: E402
                                                                 pallas_lightning_attention)
from pallas_kernels.lightning_attention.sweep_kernel import SweepConfig  # noqa: E402

DEFAULT = SweepConfig()  # pallas_attention.choose_backward_config picks it, or a wider tiling by its rule
CANDIDATES = {
    "default": DEFAULT,
    "stages2": dataclasses.replace(DEFAULT, num_stages=2),
    "stages4": dataclasses.replace(DEFAULT, num_stages=4),
    "warps8": dataclasses.replace(DEFAULT, num_warps=8),
    "bv32": dataclasses.replace(DEFAULT, block_v=32),
    "bv32-w2": dataclasses.replace(DEFAULT, block_v=32, num_warps=2),
    "bv128-w8": dataclasses.replace(DEFAULT, block_v=128, num_warps=8),
    "bv128-w8-1span": dataclasses.replace(DEFAULT, block_v=128, num_warps=8, target_programs=0),
    "block32": dataclasses.replace(DEFAULT, block=32),
    "block32-bv128-w8": dataclasses.replace(DEFAULT, block=32, block_v=128, num_warps=8),
    "spans2048": dataclasses.replace(DEFAULT, target_programs=2048),
    "spans8192": dataclasses.replace(DEFAULT, target_programs=8192, min_span_blocks=2),
}
OUT = os.environ.get("OUT", ".")
START = time.perf_counter()


def say(*parts):
    print(f"[{time.perf_counter() - START:5.0f}s] " + " ".join(str(p) for p in parts), flush=True)


def ours(shape, backward_config, interpret):
    q, k, v, do, slopes = inputs(shape)
    forward = choose_forward_config(shape, q.dtype)

    def f(q, k, v):
        return pallas_lightning_attention(q, k, v, slopes, config=forward, backward_config=backward_config,
                                          interpret=interpret)[0]
    grad = jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))
    return grad, (q, k, v, do)


def fla_call(torch, fla, shape):
    q, k, v, do, slopes = inputs(shape)
    tq, tk, tv = (torch.from_dlpack(x).requires_grad_(True) for x in (q, k, v))
    tdo, g_gamma = torch.from_dlpack(do), -torch.from_dlpack(slopes)

    def call():
        o = fla(tq, tk, tv, g_gamma=g_gamma, scale=1.0)[0]
        return torch.autograd.grad(o, (tq, tk, tv), tdo)
    return call


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="1,0,4", help="comma indices into lightning_grid.GRID")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which no measurement starts")
    parser.add_argument("--no-fla", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU: interpret=True, tiny shapes, no FLA")
    args = parser.parse_args(argv)
    os.makedirs(OUT, exist_ok=True)
    shapes = SMOKE_GRID if args.smoke else [GRID[int(i)] for i in args.shapes.split(",")]
    reps = 2 if args.smoke else 5
    torch, fla = (None, None) if (args.no_fla or args.smoke) else load_fla()
    say(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, shapes {shapes}, FLA {'yes' if fla else 'no'}")
    rows, order = [], list(CANDIDATES)
    for n, shape in enumerate(shapes):
        row = {"shape": list(shape), "ms": {}, "err": {}, "errors": {}}
        rows.append(row)
        reference = None
        for name in order:
            if time.perf_counter() - START > args.budget:
                row["errors"][name] = "budget"
                continue
            try:
                grad, operands = ours(shape, CANDIDATES[name], args.smoke)
                grads = jax.block_until_ready(grad(*operands))
                if reference is None:
                    reference = grads
                row["err"][name] = max(rel_err(g, r) for g, r in zip(grads, reference))
                row["ms"][name] = 1e3 * bench(lambda: grad(*operands), jax.block_until_ready, reps=reps)
            except Exception as err:  # a tiling that does not compile (shared memory, registers)
                row["errors"][name] = f"{type(err).__name__}: {str(err)[:200]}"
            say(shape, name, row["ms"].get(name), row["err"].get(name), row["errors"].get(name, ""))
        if fla is not None and time.perf_counter() - START <= args.budget:
            try:
                row["fla_ms"] = 1e3 * bench(fla_call(torch, fla, shape), lambda _: torch.cuda.synchronize(), reps=reps)
            except Exception as err:
                row["errors"]["fla"] = f"{type(err).__name__}: {str(err)[:200]}"
        with open(os.path.join(OUT, "lightning_backward.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if n == 0:  # later shapes: the default tiling and the three fastest here
            fastest = sorted((ms, name) for name, ms in row["ms"].items() if name != "default")[:3]
            order = ["default"] + [name for _, name in fastest]
    print(f"\n== lightning forward+backward (shipped forward; backward tiling per column), bf16, "
          f"{jax.devices()[0].device_kind}; ms per call, FLA/ours in brackets; err = max rel. L2 vs default")
    for row in rows:
        fla_ms = row.get("fla_ms")
        print(f"{tuple(row['shape'])}: FLA {fla_ms if fla_ms is None else round(fla_ms, 3)} ms")
        for name, ms in sorted(row["ms"].items(), key=lambda item: item[1]):
            ratio = f" ({fla_ms / ms:.2f}x)" if fla_ms else ""
            print(f"  {name:18s} {ms:8.3f}{ratio}  err {row['err'][name]:.1e}")
        for name, error in row["errors"].items():
            print(f"  {name:18s} {error}")


if __name__ == "__main__":
    main()
