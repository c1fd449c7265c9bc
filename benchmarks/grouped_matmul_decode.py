"""The grouped matmul at decode sizes (a few rows per call): which tiling reads the routed experts' weights fastest.

    PYTHONPATH=. python3 benchmarks/grouped_matmul_decode.py            # on the GPU machine (one call, ~1 min)
    PYTHONPATH=. python3 benchmarks/grouped_matmul_decode.py --smoke    # tiny shapes, interpret mode, any machine

Why: a batch-1 decode step of hf-bench spends ~0.33 of its ~0.70 ms device time in the MoE's 24 grouped matmuls
(benchmarks/RESULTS.md, "Decode at batch 1: where the step goes"), each multiplying 2 rows by 2 experts' weights.
The default tiling (block_n 256) gives such a call 12 programs on a 132-SM card, so it reads ~6 MB at a fraction of
the memory bandwidth. Decode is bound by reading weights, so the figure of merit is bytes read per second.

What it does: for M = 2, 16, 128 rows (batch 1, 8, 64 at top-2) over E experts, the up (K hidden, N expert width) and
down (K expert width, N hidden) shapes of hf-bench, random routing:
1. checks every candidate tiling against the float32 reference on the device;
2. times each as decode meets it: L layers' distinct weights in one jitted call (weights streamed from HBM, not
   replayed from L2), time per kernel = call / L; peers in the same run: the default tiling, jax.lax.ragged_dot,
   and the card's streaming rate (a reduction over a 2 GiB array: the bytes-read floor);
3. prints a table last: microseconds per kernel, GB/s of routed weights (experts with at least one row x K x N x
   2 bytes), and the ratio to the default tiling.
Writes JSON lines to $OUT/grouped_matmul_decode.jsonl as it goes.
"""
import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import json_logger, rel_err, timed
from pallas_kernels.grouped_matmul import Tiling, default_tiling, grouped_matmul, grouped_matmul_reference

HIDDEN, EXPERT, EXPERTS, LAYERS = 1024, 1536, 8, 24  # hf-bench: 8 layers x 3 expert matmuls per decode step
SMOKE = dict(hidden=32, expert=48, experts=4, layers=2, rows=(5,), candidates=2)
# Small row tiles (rows are few); narrow column tiles give many programs; long K steps keep loads in flight.
# The first round (RESULTS.md, "Grouped matmul at decode sizes") made 16 x 64 x 128 the small-row default; this
# round times it with the K steps split over 2-8 programs per tile (split_k) and with the "aligned" schedule
# (one row tile visiting every group: no idle programs for the empty groups), beside the best of the first round.
NARROW = Tiling(16, 64, 128, 4, 4)
CANDIDATES = [NARROW, dataclasses.replace(NARROW, split_k=4), Tiling(16, 32, 512, 4, 3), Tiling(64, 64, 128, 4, 4),
              dataclasses.replace(NARROW, split_k=2), dataclasses.replace(NARROW, split_k=8),
              Tiling(16, 64, 64, 4, 4, split_k=4),
              dataclasses.replace(NARROW, schedule="aligned"),
              dataclasses.replace(NARROW, schedule="aligned", split_k=4)]
OUT = os.environ.get("OUT", ".")
FAILURES = []


def label_of(t: Tiling) -> str:
    extra = (f" split{t.split_k}" if t.split_k > 1 else "") + (" aligned" if t.schedule == "aligned" else "")
    return f"bm{t.block_m} bn{t.block_n} bk{t.block_k} w{t.num_warps} s{t.num_stages}{extra}"


def routed_sizes(rows: int, experts: int, seed: int) -> np.ndarray:
    """Group sizes of `rows` rows at top-2 routing drawn uniformly (each token's two experts differ)."""
    rng = np.random.default_rng(seed)
    tokens = max(rows // 2, 1)
    picks = np.concatenate([rng.choice(experts, 2, replace=False) for _ in range(tokens)])[:rows]
    return np.bincount(picks, minlength=experts).astype(np.int32)


def stacked_call(op, count: int):
    """One jitted call applying op to `count` distinct weight sets (Python-unrolled: each a parameter of its own, so
    no slice copies); the outputs are summed so that none is dead code."""
    def run(lhs, rhs_list, sizes):
        return sum(op(lhs, rhs, sizes)[0, 0].astype(jnp.float32) for rhs in rhs_list)
    return jax.jit(run)


def stream_rate(interpret: bool) -> float:
    """Bytes per second of a bf16 reduction over a 2 GiB array (64 KiB on the CPU smoke): the bandwidth floor."""
    size = 1 << (15 if interpret else 30)
    x = jnp.ones((size,), jnp.bfloat16)
    seconds = timed(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), x, reps=5, inner=3)
    return 2 * size / seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode (no GPU needed)")
    args = parser.parse_args(argv)
    interpret = args.smoke
    os.makedirs(OUT, exist_ok=True)
    log = json_logger(os.path.join(OUT, "grouped_matmul_decode.jsonl"))
    hidden, expert, experts, layers, row_counts = ((SMOKE["hidden"], SMOKE["expert"], SMOKE["experts"],
                                                    SMOKE["layers"], SMOKE["rows"]) if args.smoke else
                                                   (HIDDEN, EXPERT, EXPERTS, LAYERS, (2, 16, 128)))
    timing = dict(reps=2, inner=1) if args.smoke else dict(reps=7, inner=3)
    log(event="env", jax=jax.__version__, kind=jax.devices()[0].device_kind, date=time.strftime("%Y-%m-%d"))
    floor = stream_rate(interpret)
    log(event="stream_rate", gb_per_s=floor / 1e9)
    default = default_tiling(jnp.bfloat16).forward  # the wide training tiles: the peer of the first round
    candidates = CANDIDATES[:SMOKE["candidates"]] if args.smoke else CANDIDATES
    variants = [(f"wide ({label_of(default)})", default)] + [(label_of(t), t) for t in candidates]
    table = []
    for rows in row_counts:
        sizes = jnp.asarray(routed_sizes(rows, experts, seed=rows))
        used = int(np.count_nonzero(np.asarray(sizes)))
        for matrix, (k, n) in (("up", (hidden, expert)), ("down", (expert, hidden))):
            keys = jax.random.split(jax.random.PRNGKey(rows), layers + 1)
            lhs = jax.random.normal(keys[0], (rows, k), jnp.float32).astype(jnp.bfloat16)
            rhs_list = [(jax.random.normal(key, (experts, k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
                        for key in keys[1:]]
            want = grouped_matmul_reference(lhs.astype(jnp.float32), rhs_list[0].astype(jnp.float32), sizes)
            weight_bytes = used * k * n * 2
            results = {}
            for label, tiling in variants:
                op = lambda a, b, g, t=tiling: grouped_matmul(a, b, g, impl="pallas", interpret=interpret, tiling=t)
                try:
                    err = rel_err(op(lhs, rhs_list[0], sizes), want)
                    seconds = timed(stacked_call(op, layers), lhs, rhs_list, sizes, **timing) / layers
                except Exception as error:  # a tiling that does not build here is reported, the rest still run
                    log(event="time", rows=rows, matrix=matrix, variant=label, error=repr(error)[:300])
                    continue
                if not err < 2e-2:
                    FAILURES.append(f"{rows} rows {matrix} {label}: rel_err {err:.2e}")
                results[label] = seconds
                log(event="time", rows=rows, matrix=matrix, variant=label, us=seconds * 1e6, rel_err=err,
                    gb_per_s=weight_bytes / seconds / 1e9)
            if not args.smoke:
                ragged = lambda a, b, g: grouped_matmul(a, b, g, impl="ragged_dot")
                results["jax.lax.ragged_dot"] = timed(stacked_call(ragged, layers), lhs, rhs_list, sizes,
                                                      **timing) / layers
                log(event="time", rows=rows, matrix=matrix, variant="jax.lax.ragged_dot",
                    us=results["jax.lax.ragged_dot"] * 1e6)
            results["bytes-read floor"] = weight_bytes / floor
            for label, seconds in results.items():
                table.append((rows, matrix, used, label, seconds, weight_bytes))
    print(f"\nstream rate {floor / 1e9:.0f} GB/s; {layers} distinct weight sets per timed call")
    print(f"{'rows':>4} {'matrix':6} {'experts':>7} {'variant':34} {'us':>8} {'GB/s':>7} {'x default':>9}"
          f"   (default: {label_of(NARROW)}, the small-row default)")
    base = {(r, m): s for r, m, _, label, s, _ in table if label == label_of(NARROW)}
    for rows, matrix, used, label, seconds, weight_bytes in table:
        ratio = base[(rows, matrix)] / seconds if (rows, matrix) in base else float("nan")
        print(f"{rows:4d} {matrix:6} {used:7d} {label:34} {seconds * 1e6:8.2f} {weight_bytes / seconds / 1e9:7.0f} "
              f"{ratio:9.2f}")
    for failure in FAILURES:
        print("FAILED", failure)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
