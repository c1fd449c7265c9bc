"""Correctness of the Pallas kernels on the GPU at awkward shapes (compiled, not interpreted).

The CPU tests run the kernels with interpret=True, which checks their logic but not what only the GPU compiler
sees (tile shapes Triton refuses, shared-memory limits). This script compiles every public op on the card at
lengths that are no multiple of any block, head dims 32/64/128, packed rows and empty expert groups, and compares
with the slow twins in float32: forward, every gradient, decode. It prints one line per case and a table last, and
exits nonzero if a case failed.

The "packed" kind checks cuDNN's packed-segment attention (`causal_attention` on packed rows: segment runs as
cuDNN documents, the bias mask as the fallback) against XLA's dense float32 path, then times it against the old
bias path and unmasked cuDNN at research-1b's attention shape (B=4, T=8192, 16 heads, 4 kv heads, D=128):

    PYTHONPATH=. python3 benchmarks/kernel_check.py [--out DIR] [--kinds packed]
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


def packed_rows(rng, batch, length, docs, padding=True):
    """(B, T) int32 segment ids: per row `docs` documents at random cuts (a different layout per row, 1-token
    documents allowed), ids counting up from 1, and on odd rows trailing padding as id 0 (the task batches' layout)."""
    rows = []
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), size=docs - 1, replace=False))
        if docs > 2:
            cuts[1] = cuts[0] + 1  # a one-token document
        row = np.searchsorted(cuts, np.arange(length), side="right") + 1
        if padding and b % 2:
            row[length - length // 7:] = 0
        rows.append(row)
    return jnp.asarray(np.stack(rows), jnp.int32)


def packed_case(rng, batch, length, heads, kv_heads, dim, seg, dispatch):
    """cuDNN on packed rows (bf16) against XLA's dense float32 path: output, the three gradients of sum(o * do),
    and the output at each document's first four tokens alone (where a boundary off by one would show). dispatch:
    "cond" (causal_attention: the device-side check picks the packed call or the bias fallback), "direct" (the packed
    call itself) or "contiguous" (causal_attention's unchecked packed call, as the inference prefill makes it)."""
    from m1jax.layers.softmax_attention import causal_attention, packed_cudnn_attention, segment_runs
    q = jnp.asarray(rng.standard_normal((batch, length, heads, dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((batch, length, kv_heads, dim)), jnp.float32) for _ in range(2))
    ct = jnp.asarray(rng.standard_normal((batch, length, heads, dim)), jnp.float32)

    def attend(a, b, c, kind):
        if kind == "dense":
            return causal_attention(a, b, c, seg, impl="dense")
        if kind == "direct":
            return packed_cudnn_attention(a, b, c, *segment_runs(seg)[:2])
        return causal_attention(a, b, c, seg, impl="cudnn", contiguous=kind == "contiguous")

    res = {}
    for kind, dtype in ((dispatch, jnp.bfloat16), ("dense", jnp.float32)):
        args = tuple(x.astype(dtype) for x in (q, k, v))
        loss = lambda a, b, c, i=kind: jnp.sum(attend(a, b, c, i).astype(jnp.float32) * ct)
        out = jax.jit(lambda a, b, c, i=kind: attend(a, b, c, i))(*args)
        res[kind] = (out,) + jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
    errs = {n: rel_err(x, y) for n, x, y in zip(("o", "dq", "dk", "dv"), res[dispatch], res["dense"])}
    seg_np = np.asarray(seg)
    starts = np.concatenate([np.ones((batch, 1), bool), seg_np[:, 1:] != seg_np[:, :-1]], axis=1)
    near = np.zeros_like(starts)
    for shift in range(4):  # a run's first four tokens (or fewer, in a shorter run)
        near[:, shift:] |= starts[:, :length - shift]
    errs["o_doc_starts"] = rel_err(np.asarray(res[dispatch][0], np.float32)[near], np.asarray(res["dense"][0])[near])
    return errs


def packed_timing(rng, batch, length, heads, kv_heads, dim, docs):
    """Forward and forward+backward ms (median), and the gradient step's temporary GiB (XLA's count), of cuDNN on
    packed rows: causal_attention's dispatch (the runs, the device-side check and the cond; and with contiguous=True,
    no check), the packed call alone at a few slot counts S (its backward accumulators grow with S), the bias mask (the
    path before) and unmasked cuDNN (one causal document per row: more work than 5 short documents)."""
    from benchmarks.common import timed
    from m1jax.layers.softmax_attention import (PACKED_MAX_RUNS, causal_attention, masked_attention,
                                                packed_cudnn_attention, segment_runs)
    seg = packed_rows(rng, batch, length, docs)
    q = jnp.asarray(rng.standard_normal((batch, length, heads, dim)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((batch, length, kv_heads, dim)), jnp.bfloat16) for _ in range(2))
    ct = jnp.asarray(rng.standard_normal((batch, length, heads, dim)), jnp.bfloat16)
    variants = {"causal_attention (cond)": lambda a, b, c: causal_attention(a, b, c, seg, impl="cudnn"),
                "causal_attention (contiguous)": lambda a, b, c: causal_attention(a, b, c, seg, impl="cudnn",
                                                                                  contiguous=True)}
    if docs >= PACKED_MAX_RUNS:  # the packed call would cover only the first S runs: the dispatch alone is exact
        variants.pop("causal_attention (contiguous)")
    for slots in sorted({8, PACKED_MAX_RUNS, 64}):
        if slots > docs:  # docs and, on odd rows, the padding
            variants[f"packed call, S={slots}"] = (
                lambda a, b, c, s=slots: packed_cudnn_attention(a, b, c, *segment_runs(seg, s)[:2]))
    variants["bias mask (before)"] = lambda a, b, c: masked_attention(a, b, c, seg, "cudnn")
    variants["no mask (1 document)"] = lambda a, b, c: causal_attention(a, b, c, None, impl="cudnn")
    rows = []
    for name, fn in variants.items():
        fwd = jax.jit(fn)
        step = jax.jit(jax.grad(lambda a, b, c, f=fn: jnp.sum(f(a, b, c).astype(jnp.float32) * ct), argnums=(0, 1, 2)))
        try:
            temp = step.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes / 2 ** 30
            times = [timed(f, q, k, v, reps=7, inner=5) * 1e3 for f in (fwd, step)]
        except Exception as err:  # noqa: BLE001
            print(f"packed timing {name}: {type(err).__name__}: {str(err)[:300]}", flush=True)
            temp, times = float("nan"), [float("nan")] * 2
        rows.append({"kind": "packed-timing", "variant": name, "shape": (batch, length, heads, kv_heads, dim),
                     "docs_per_row": docs, "fwd_ms": times[0], "fwd_bwd_ms": times[1], "step_temp_gib": temp})
        print(f"packed timing {name:29s} docs {docs:3d} fwd {times[0]:7.3f} ms  fwd+bwd {times[1]:7.3f} ms  "
              f"temp {temp:6.2f} GiB", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--interpret", action="store_true", help="CPU smoke: tiny shapes in interpret mode")
    parser.add_argument("--kinds", default="softmax,packed,lightning,decode,grouped", help="which kernels to check")
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
    timings = []
    if not args.interpret and "packed" in kinds:  # cuDNN's packed segments (GQA, uneven documents, 1-token ones)
        from m1jax.layers.softmax_attention import PACKED_MAX_RUNS, packed_cudnn_supported, segment_runs
        if not packed_cudnn_supported():  # the dispatch would silently take the bias path: say so, loudly
            print(f"packed: cuDNN's packed layout is unsupported here (backend {jax.default_backend()}, devices "
                  f"{jax.devices()}); causal_attention keeps the bias path. FAIL", flush=True)
            record("packed", "unsupported", "bfloat16", {"unsupported": float("inf")}, 2e-2)
        else:
            cases = [  # (B, T, H, K, D), layout, dispatch; "returning" and "many" must take the bias fallback
                ((2, 2048, 16, 4, 128), "5 docs", "cond"), ((2, 2048, 16, 4, 128), "5 docs", "direct"),
                ((2, 2050, 8, 2, 64), "13 docs", "cond"), ((1, 1000, 8, 1, 128), "returning id", "cond"),
                ((2, 1000, 4, 2, 64), f"{PACKED_MAX_RUNS + 1} docs", "cond"),
                ((3, 1536, 8, 2, 128), "left padding", "contiguous")]
            for (b, t, h, kvh, d), layout, dispatch in cases:
                if layout == "left padding":
                    seg = jnp.asarray(np.arange(t)[None, :] >= rng.integers(0, t // 2, (b, 1)), jnp.int32)
                elif layout == "returning id":
                    seg = packed_rows(rng, b, t, 4, padding=False)
                    seg = jnp.where(seg == 4, 1, seg)  # the last document takes the first one's id
                else:
                    seg = packed_rows(rng, b, t, int(layout.split()[0]))
                fits = bool(segment_runs(seg)[2])
                print(f"packed {layout}: {'packed call' if fits else 'bias fallback'}", flush=True)
                try:
                    errs = packed_case(rng, b, t, h, kvh, d, seg, dispatch)
                except Exception as err:  # noqa: BLE001
                    errs = {"error": float("inf")}
                    print(f"packed {b, t, h, kvh, d} {layout}: {type(err).__name__}: {str(err)[:300]}", flush=True)
                record("packed", (b, t, h, kvh, d, layout, dispatch), "bfloat16", errs, 2e-2)
            for docs in (5, 48):
                timings += packed_timing(rng, 4, 8192, 16, 4, 128, docs)
            for row in timings:
                log.write(json.dumps(row) + "\n")
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
    if timings:
        print("\n| cuDNN on packed rows (B, T, H, K, D) | docs/row | variant | fwd ms | fwd+bwd ms | step temp GiB |\n"
              "|---|---|---|---|---|---|")
        for r in timings:
            print(f"| {r['shape']} | {r['docs_per_row']} | {r['variant']} | {r['fwd_ms']:.3f} | "
                  f"{r['fwd_bwd_ms']:.3f} | {r['step_temp_gib']:.2f} |")
    failed = sum(not r["ok"] for r in rows)
    print(f"\n{sum(r['ok'] for r in rows)} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
