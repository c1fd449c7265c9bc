"""Correctness of the Pallas kernels on the GPU at awkward shapes (compiled, not interpreted).

The CPU tests run the kernels with interpret=True, which checks their logic but not what only the GPU compiler
sees (tile shapes Triton refuses, shared-memory limits). This script compiles every public op on the card at
lengths that are no multiple of any block, head dims 32/64/128, packed rows and empty expert groups, and compares
with the slow twins in float32: forward, every gradient, decode. It prints one line per case and a table last.

    PYTHONPATH=. python3 benchmarks/kernel_check.py [--out DIR]
"""
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.grouped_matmul import grouped_matmul
from pallas_kernels.lightning_attention import lightning_attention, lightning_decode

jax.config.update("jax_default_matmul_precision", "highest")


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


INTERPRET = False  # --interpret: a CPU smoke of this script (tiny shapes)


def lightning_case(rng, batch, length, heads, dim, dtype, packed):
    q, k, v = (jnp.asarray(rng.standard_normal((batch, length, heads, dim)) * 0.5, dtype) for _ in range(3))
    slopes = jnp.asarray(2.0 ** (-8.0 * (np.arange(heads) + 1) / heads), jnp.float32)
    s0 = jnp.asarray(rng.standard_normal((batch, heads, dim, dim)) * 0.1, jnp.float32)
    seg = None
    if packed:
        cuts = np.sort(rng.choice(np.arange(1, length), size=min(3, length - 1), replace=False))
        seg = jnp.asarray(np.broadcast_to(np.searchsorted(cuts, np.arange(length), side="right"), (batch, length)),
                          jnp.int32)
    ct = jnp.asarray(rng.standard_normal((batch, length, heads, dim)), jnp.float32)

    def loss(impl, q, k, v, s0):
        o, s = lightning_attention(q, k, v, slopes, initial_state=s0, return_final_state=True, segment_ids=seg,
                                   impl=impl, interpret=INTERPRET and impl == "pallas")
        return jnp.sum(o.astype(jnp.float32) * ct) + jnp.sum(s), (o, s)

    out = {}
    for impl in ("pallas", "naive"):
        args = (q, k, v, s0) if impl == "pallas" else tuple(x.astype(jnp.float32) for x in (q, k, v)) + (s0,)
        (_, (o, s)), grads = jax.jit(jax.value_and_grad(lambda *a, i=impl: loss(i, *a), argnums=(0, 1, 2, 3),
                                                         has_aux=True))(*args)
        out[impl] = (o, s) + tuple(grads)
    names = ("o", "state", "dq", "dk", "dv", "ds0")
    return {n: rel_err(a, b) for n, a, b in zip(names, out["pallas"], out["naive"])}


def decode_case(rng, batch, heads, dim):
    q, k, v = (jnp.asarray(rng.standard_normal((batch, heads, dim)), jnp.float32) for _ in range(3))
    slopes = jnp.asarray(2.0 ** (-8.0 * (np.arange(heads) + 1) / heads), jnp.float32)
    state = jnp.asarray(rng.standard_normal((batch, heads, dim, dim)) * 0.1, jnp.float32)
    o1, s1 = lightning_decode(q, k, v, slopes, state, impl="pallas", interpret=INTERPRET)
    o2, s2 = lightning_decode(q, k, v, slopes, state, impl="jnp")
    return {"o": rel_err(o1, o2), "state": rel_err(s1, s2)}


def grouped_case(rng, rows, k_dim, n_dim, experts, dtype):
    sizes = rng.multinomial(rows - 37, rng.dirichlet(np.ones(experts) * 0.3))
    sizes[rng.integers(experts)] = 0  # an empty group
    sizes[0] += int(rows - 37 - sizes.sum())
    lhs = jnp.asarray(rng.standard_normal((rows, k_dim)), dtype)
    rhs = jnp.asarray(rng.standard_normal((experts, k_dim, n_dim)) / np.sqrt(k_dim), dtype)
    gs = jnp.asarray(sizes, jnp.int32)
    ct = jnp.asarray(rng.standard_normal((rows, n_dim)), jnp.float32)

    def f(impl, a, b):
        return jnp.sum(grouped_matmul(a, b, gs, impl=impl, interpret=INTERPRET and impl == "pallas").astype(jnp.float32) * ct)

    res = {}
    for impl in ("pallas", "reference"):
        a, b = (lhs, rhs) if impl == "pallas" else (lhs.astype(jnp.float32), rhs.astype(jnp.float32))
        y = grouped_matmul(a, b, gs, impl=impl, interpret=INTERPRET and impl == "pallas")
        da, db = jax.jit(jax.grad(lambda x, w, i=impl: f(i, x, w), argnums=(0, 1)))(a, b)
        res[impl] = (y, da, db)
    return {n: rel_err(x, y) for n, x, y in zip(("out", "d_lhs", "d_rhs"), res["pallas"], res["reference"])}


def softmax_case(rng, batch, length, heads, kv_heads, dim):
    """The model's causal attention with a packing mask (bf16, impl "auto": cuDNN with the mask as a bias at an
    even length, XLA's paths at an odd one) against XLA's dense float32 path: output and the three gradients."""
    from m1jax.layers.softmax_attention import causal_attention
    q = jnp.asarray(rng.standard_normal((batch, length, heads, dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((batch, length, kv_heads, dim)), jnp.float32) for _ in range(2))
    cuts = np.sort(rng.choice(np.arange(1, length), size=min(3, length - 1), replace=False))
    seg = jnp.asarray(np.broadcast_to(np.searchsorted(cuts, np.arange(length), side="right"), (batch, length)),
                      jnp.int32)
    ct = jnp.asarray(rng.standard_normal((batch, length, heads, dim)), jnp.float32)
    res = {}
    for impl, dtype in (("auto", jnp.bfloat16), ("dense", jnp.float32)):
        def f(a, b, c, i=impl):
            return jnp.sum(causal_attention(a, b, c, seg, impl=i).astype(jnp.float32) * ct)
        args = tuple(x.astype(dtype) for x in (q, k, v))
        out = jax.jit(lambda a, b, c, i=impl: causal_attention(a, b, c, seg, impl=i))(*args)
        res[impl] = (out,) + jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*args)
    return {n: rel_err(x, y) for n, x, y in zip(("o", "dq", "dk", "dv"), res["auto"], res["dense"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--interpret", action="store_true", help="CPU smoke: tiny shapes in interpret mode")
    parser.add_argument("--kinds", default="softmax,lightning,decode,grouped", help="which kernels to check")
    args = parser.parse_args()
    kinds = set(args.kinds.split(","))
    global INTERPRET
    INTERPRET = args.interpret
    seed = int(time.time())
    print(f"seed {seed}", flush=True)
    rng = np.random.default_rng(seed)
    rows = []
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "kernel_check.jsonl"), "w")

    def record(kind, shape, dtype, errs, tol):
        worst = max(errs.values())
        row = {"kind": kind, "shape": shape, "dtype": dtype, "errors": errs, "tol": tol, "ok": worst <= tol}
        rows.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(f"{kind:10s} {str(shape):28s} {dtype:9s} worst {worst:.2e} (tol {tol:g}) "
              f"{'ok' if row['ok'] else 'FAIL'}", flush=True)

    if not args.interpret and "softmax" in kinds:  # cuDNN with a packing mask (GQA, a length no multiple of a block)
        for (b, t, h, kvh, d) in [(2, 1000, 8, 2, 128), (1, 4099, 4, 1, 64)]:
            try:
                errs = softmax_case(rng, b, t, h, kvh, d)
            except Exception as err:  # noqa: BLE001
                errs = {"error": float("inf")}
                print(f"softmax {b, t, h, kvh, d}: {type(err).__name__}: {str(err)[:300]}", flush=True)
            record("softmax", (b, t, h, kvh, d, "packed"), "bfloat16", errs, 2e-2)
    # lengths that are no multiple of any block (the kernels mask a ragged tail: the last row of a batch is where an
    # unmasked access would run past the buffer); head dims 32/64/128; batch x short rows; packed rows; > 16K tokens
    # per row takes the sweep
    cases = [(1, 154, 4, 64, False), (2, 700, 4, 128, True), (3, 77, 2, 32, False), (16, 1000, 4, 128, False),
             (16, 2047, 8, 64, False), (2, 1, 2, 64, False), (2, 16385, 2, 64, False), (1, 4099, 4, 128, True),
             (1, 20001, 2, 128, False)]
    for (b, t, h, d, packed) in (cases[2:3] if args.interpret else cases) if "lightning" in kinds else ():
        for dtype, tol in (("float32", 1e-4), ("bfloat16", 2e-2)):
            try:
                errs = lightning_case(rng, b, t, h, d, getattr(jnp, dtype), packed)
            except Exception as err:  # a compile failure is a finding, not a crash of the whole check
                errs = {"error": float("inf")}
                print(f"lightning {b, t, h, d} {dtype}: {type(err).__name__}: {str(err)[:300]}", flush=True)
            record("lightning", (b, t, h, d, "packed" if packed else "rows"), dtype, errs, tol)
    for (b, h, d) in [(1, 4, 64), (5, 3, 128), (33, 2, 32)][: 1 if args.interpret else 3] if "decode" in kinds else ():
        record("decode", (b, h, d), "float32", decode_case(rng, b, h, d), 1e-5)
    grouped = [(300, 64, 96, 8)] if args.interpret else [(1000, 256, 384, 8), (4133, 512, 1408, 32)]
    for (m, kd, nd, e) in grouped if "grouped" in kinds else ():
        for dtype, tol in (("float32", 1e-5), ("bfloat16", 1e-2)):
            record("grouped", (m, kd, nd, e), dtype, grouped_case(rng, m, kd, nd, e, getattr(jnp, dtype)), tol)

    print("\n| kernel | shape | dtype | worst rel. error | tol | ok |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['shape']} | {r['dtype']} | {max(r['errors'].values()):.2e} | {r['tol']:g} | "
              f"{'ok' if r['ok'] else 'FAIL'} |")
    print(f"\n{sum(r['ok'] for r in rows)} passed, {sum(not r['ok'] for r in rows)} failed")


if __name__ == "__main__":
    main()
