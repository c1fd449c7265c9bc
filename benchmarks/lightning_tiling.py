"""Lightning attention under candidate tilings, one part at a time, against FLA in the same run.

    PYTHONPATH=. python3 benchmarks/lightning_tiling.py --part backward [--shapes 1,0,4] [--budget 420] [--no-fla]
    PYTHONPATH=. python3 benchmarks/lightning_tiling.py --part forward --shapes 0,2 [--candidates default,...]
    PYTHONPATH=. python3 benchmarks/lightning_tiling.py --smoke      # CPU, interpret=True, tiny shapes, no FLA
FLA is not installed on the GPU machine: `make card-wheels` here, carry .whl, and start the call with the install
line it prints (it holds fla-core and einops).

Per shape (B, T, H, D) of benchmarks/lightning_grid.GRID, bf16:
  --part backward  forward+backward (the shipped forward, `jax.vjp`) with each candidate SweepConfig of the three
                   backward sweeps (pallas_attention._backward: dq forward over (do, v, k); dv, dk in reverse);
                   dq, dk, dv checked against the default tiling's; FLA's chunk_simple_gla forward+backward
  --part forward   the chunk-parallel forward (chunk_kernel.py: the states kernel, then the output kernel) with each
                   candidate change to the shape's shipped ChunkConfig; o checked against the shipped one's; FLA's
                   forward (shapes where the sweep ships are skipped)
(relative L2 over the whole tensors). Timing as in lightning_grid.bench (median of 5 batches of back-to-back calls,
one sync each). The first shape gets every candidate (or --candidates); later shapes the default one and the
three fastest at the first. Writes $OUT/lightning_tiling.jsonl as it goes and prints the table last. (Until
2026-12-01 this was benchmarks/lightning_backward.py, the backward part alone.)
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
from pallas_kernels.lightning_attention.chunk_kernel import ChunkConfig  # noqa: E402
from pallas_kernels.lightning_attention.pallas_attention import (choose_forward_config,  # noqa: E402
                                                                 pallas_lightning_attention)
from pallas_kernels.lightning_attention.sweep_kernel import SweepConfig  # noqa: E402

SWEEP = SweepConfig()  # pallas_attention.choose_backward_config picks it, or a wider tiling by its rule
CANDIDATES = {
    "backward": {
        "default": SWEEP,
        "stages2": dataclasses.replace(SWEEP, num_stages=2),
        "stages4": dataclasses.replace(SWEEP, num_stages=4),
        "warps8": dataclasses.replace(SWEEP, num_warps=8),
        "bv32": dataclasses.replace(SWEEP, block_v=32),
        "bv32-w2": dataclasses.replace(SWEEP, block_v=32, num_warps=2),
        "bv128-w8": dataclasses.replace(SWEEP, block_v=128, num_warps=8),
        "bv128-w8-1span": dataclasses.replace(SWEEP, block_v=128, num_warps=8, target_programs=0),
        "block32": dataclasses.replace(SWEEP, block=32),
        "block32-bv128-w8": dataclasses.replace(SWEEP, block=32, block_v=128, num_warps=8),
        "spans2048": dataclasses.replace(SWEEP, target_programs=2048),
        "spans8192": dataclasses.replace(SWEEP, target_programs=8192, min_span_blocks=2),
    },
    "forward": {  # changes to the shipped ChunkConfig (choose_forward_config) of each shape
        "default": {},
        "states-stages1": dict(states_num_stages=1),
        "states-stages3": dict(states_num_stages=3),
        "states-stages3-out-stages1": dict(states_num_stages=3, num_stages=1),
        "states-stages4": dict(states_num_stages=4),
        "states-warps2": dict(states_num_warps=2),
        "states-warps8": dict(states_num_warps=8),
        "state-tile32": dict(state_tile=32),
        "state-tile32-warps2": dict(state_tile=32, states_num_warps=2),
        "out-stages1": dict(num_stages=1),
        "out-stages3": dict(num_stages=3),
        "out-warps8": dict(num_warps=8),
        "out-bv64": dict(block_v=64),
        "chunk64": dict(chunk_blocks=1),
        # one output program per 128-token chunk: each chunk state and key block read once per chunk, not per
        # 64-row block (notes_lightning.md, "Not done / next" (b)); written 2026-12-01, not yet run on the card
        "block128-w8": dict(block=128, chunk_blocks=1, num_warps=8),
        "block128-w8-bv64": dict(block=128, chunk_blocks=1, num_warps=8, block_v=64),
        "block128-w4": dict(block=128, chunk_blocks=1, num_warps=4),
    },
}
OUT = os.environ.get("OUT", ".")
START = time.perf_counter()


def say(*parts):
    print(f"[{time.perf_counter() - START:5.0f}s] " + " ".join(str(p) for p in parts), flush=True)


def ours(part, shape, config, interpret):
    """(jitted call, its operands): forward+backward with `config` as the backward tiling, or the forward with
    the shape's shipped ChunkConfig changed by `config` (a dict of fields)."""
    q, k, v, do, slopes = inputs(shape)
    forward = choose_forward_config(shape, q.dtype)
    if part == "forward":
        tiling = dataclasses.replace(forward, **config)
        call = jax.jit(lambda q, k, v: pallas_lightning_attention(q, k, v, slopes, config=tiling,
                                                                  interpret=interpret)[0])
        return call, (q, k, v)

    def f(q, k, v):
        return pallas_lightning_attention(q, k, v, slopes, config=forward, backward_config=config,
                                          interpret=interpret)[0]
    return jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do)), (q, k, v, do)


def fla_call(part, torch, fla, shape):
    q, k, v, do, slopes = inputs(shape)
    tq, tk, tv = (torch.from_dlpack(x).requires_grad_(part == "backward") for x in (q, k, v))
    tdo, g_gamma = torch.from_dlpack(do), -torch.from_dlpack(slopes)

    def call():
        o = fla(tq, tk, tv, g_gamma=g_gamma, scale=1.0)[0]
        return o if part == "forward" else torch.autograd.grad(o, (tq, tk, tv), tdo)
    return call


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=sorted(CANDIDATES), default="backward")
    parser.add_argument("--shapes", default="1,0,4", help="comma indices into lightning_grid.GRID")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which no measurement starts")
    parser.add_argument("--candidates", help="comma list of candidate names (default: all at the first shape, then "
                        "the default and the three fastest there)")
    parser.add_argument("--no-fla", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU: interpret=True, tiny shapes, no FLA")
    args = parser.parse_args(argv)
    os.makedirs(OUT, exist_ok=True)
    shapes = SMOKE_GRID if args.smoke else [GRID[int(i)] for i in args.shapes.split(",")]
    reps = 2 if args.smoke else 5
    torch, fla = (None, None) if (args.no_fla or args.smoke) else load_fla()
    candidates = CANDIDATES[args.part]
    if args.part == "forward":  # the candidates change a ChunkConfig: shapes where the sweep ships are not swept
        skipped = [s for s in shapes if not isinstance(choose_forward_config(s, jax.numpy.bfloat16), ChunkConfig)]
        if skipped:
            say(f"skipped (the forward ships the sweep there): {skipped}")
        shapes = [s for s in shapes if s not in skipped]
    order = list(candidates)
    if args.candidates:
        order = [name.strip() for name in args.candidates.split(",")]
        unknown = [name for name in order if name not in candidates]
        if unknown:
            raise SystemExit(f"--candidates: unknown {unknown}; choose from {sorted(candidates)}")
    say(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, part {args.part}, shapes {shapes}, "
        f"FLA {'yes' if fla else 'no'}")
    rows = []
    for n, shape in enumerate(shapes):
        row = {"part": args.part, "shape": list(shape), "ms": {}, "err": {}, "errors": {}}
        rows.append(row)
        reference = None
        for name in order:
            if time.perf_counter() - START > args.budget:
                row["errors"][name] = "budget"
                continue
            try:
                call, operands = ours(args.part, shape, candidates[name], args.smoke)
                outputs = jax.tree.leaves(jax.block_until_ready(call(*operands)))
                if reference is None:
                    reference = outputs
                row["err"][name] = max(rel_err(g, r) for g, r in zip(outputs, reference))
                row["ms"][name] = 1e3 * bench(lambda: call(*operands), jax.block_until_ready, reps=reps)
            except Exception as err:  # a tiling that does not compile (shared memory, registers)
                row["errors"][name] = f"{type(err).__name__}: {str(err)[:200]}"
            say(shape, name, row["ms"].get(name), row["err"].get(name), row["errors"].get(name, ""))
        if fla is not None and time.perf_counter() - START <= args.budget:
            try:
                row["fla_ms"] = 1e3 * bench(fla_call(args.part, torch, fla, shape), lambda _: torch.cuda.synchronize(),
                                            reps=reps)
            except Exception as err:
                row["errors"]["fla"] = f"{type(err).__name__}: {str(err)[:200]}"
        with open(os.path.join(OUT, "lightning_tiling.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if n == 0 and not args.candidates:  # later shapes: the default tiling and the three fastest here
            fastest = sorted((ms, name) for name, ms in row["ms"].items() if name != "default")[:3]
            order = ["default"] + [name for _, name in fastest]
    what = "forward (chunk tiling" if args.part == "forward" else "forward+backward (shipped forward; backward tiling"
    print(f"\n== lightning {what} per row), bf16, {jax.devices()[0].device_kind}; ms per call, FLA/ours in "
          "brackets; err = max rel. L2 vs default")
    for row in rows:
        fla_ms = row.get("fla_ms")
        print(f"{tuple(row['shape'])}: FLA {fla_ms if fla_ms is None else round(fla_ms, 3)} ms")
        for name, ms in sorted(row["ms"].items(), key=lambda item: item[1]):
            ratio = f" ({fla_ms / ms:.2f}x)" if fla_ms else ""
            print(f"  {name:20s} {ms:8.3f}{ratio}  err {row['err'][name]:.1e}")
        for name, error in row["errors"].items():
            print(f"  {name:20s} {error}")


if __name__ == "__main__":
    main()
