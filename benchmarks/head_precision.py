"""The lm_head's matmul precision: how far each variant's token probabilities are from float64, and what it costs.

    PYTHONPATH=. python3 benchmarks/head_precision.py            # on the GPU machine (one call, ~1 min)
    PYTHONPATH=. python3 benchmarks/head_precision.py --smoke    # small shapes, any machine

M1's "float32 head" (RunPolicy.float32_lm_head) is the paper's fix for the mismatch between the sampler's and the
trainer's token probabilities. At JAX's default matmul precision an NVIDIA GPU multiplies float32 operands on TF32
tensor cores (10-bit mantissa), so "float32" there is not float32. Variants of logits = h @ W (research-1b's head:
hidden 2048, vocabulary 32,000):
  bf16            bf16 operands, float32 accumulation (RunPolicy(float32_lm_head=False))
  float32         float32 operands at the default precision (the library's default head; TF32 on the GPU)
  float32-bf16x3  float32 operands, DotAlgorithmPreset.BF16_BF16_F32_X3 (three bf16 products: ~16-bit mantissa)
  float32-highest float32 operands, Precision.HIGHEST (full float32 products)
Accuracy: --tokens rows of h ~ N(0, 1), W ~ N(0, scale^2 / hidden) (logits of standard deviation `scale`, for scale 1
and 4), one token drawn per row from the float64 distribution (numpy, on the host); per variant, the token's
log-probability error against float64 (max and mean absolute), the largest error of a probability, and the Pearson
correlation of the token probabilities with float64's (the paper's figure for sampler against trainer).
Cost: the forward matmul at research-1b's training size (4 x 8192 rows) and forward + both gradients, median ms.
Writes $OUT/head_precision.jsonl; prints a table last.
"""
import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import json_logger, timed

OUT = os.environ.get("OUT", ".")

VARIANTS = {
    "bf16": (jnp.bfloat16, None),
    "float32": (jnp.float32, None),
    "float32-bf16x3": (jnp.float32, jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3),
    "float32-highest": (jnp.float32, jax.lax.Precision.HIGHEST),
}


def head(variant):
    dtype, precision = VARIANTS[variant]

    def logits(h, w):
        return jnp.dot(h.astype(dtype), w.astype(dtype), precision=precision,
                       preferred_element_type=jnp.float32)
    return logits


def log_softmax64(logits):
    logits = logits - logits.max(axis=-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))


def accuracy(tokens, hidden, vocab, scale, seed, log):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((tokens, hidden)).astype(np.float32)
    w = (rng.standard_normal((hidden, vocab)) * scale / np.sqrt(hidden)).astype(np.float32)
    ref = log_softmax64(h.astype(np.float64) @ w.astype(np.float64))
    drawn = np.array([rng.choice(vocab, p=np.exp(row)) for row in ref])
    ref_token = ref[np.arange(tokens), drawn]
    rows = []
    for variant in VARIANTS:
        got = np.asarray(jax.jit(head(variant))(h, w), np.float64)
        lp = log_softmax64(got)
        token = lp[np.arange(tokens), drawn]
        err = np.abs(token - ref_token)
        row = dict(variant=variant, scale=scale, tokens=tokens, logprob_err_max=float(err.max()),
                   logprob_err_mean=float(err.mean()), prob_err_max=float(np.abs(np.exp(lp) - np.exp(ref)).max()),
                   token_prob_corr=float(np.corrcoef(np.exp(token), np.exp(ref_token))[0, 1]))
        log(event="accuracy", **row)
        rows.append(row)
    return rows


def cost(rows, hidden, vocab, timing, log):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    h = jax.random.normal(keys[0], (rows, hidden), jnp.float32)
    w = jax.random.normal(keys[1], (hidden, vocab), jnp.float32) * 0.02
    d = jax.random.normal(keys[2], (rows, vocab), jnp.float32)
    flops = 2.0 * rows * hidden * vocab
    out = {}
    for variant in VARIANTS:
        f = head(variant)
        fwd = timed(jax.jit(f), h, w, **timing)
        both = timed(jax.jit(lambda h, w, d: jax.vjp(f, h, w)[1](d)), h, w, d, **timing)
        out[variant] = (fwd, both)
        log(event="cost", variant=variant, rows=rows, fwd_ms=fwd * 1e3, fwd_tflops=flops / fwd / 1e12,
            fwd_bwd_ms=both * 1e3, fwd_bwd_tflops=3 * flops / both / 1e12)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="small shapes (any machine)")
    parser.add_argument("--tokens", type=int, default=2048, help="rows of the accuracy check")
    args = parser.parse_args(argv)
    hidden, vocab, rows = (64, 500, 256) if args.smoke else (2048, 32_000, 4 * 8192)
    tokens = 64 if args.smoke else args.tokens
    timing = dict(reps=2, inner=1) if args.smoke else dict(reps=7, inner=3)
    log = json_logger(os.path.join(OUT, "head_precision.jsonl"))
    log(event="env", jax=jax.__version__, device=jax.devices()[0].device_kind, date=time.strftime("%Y-%m-%d"))
    acc = [row for scale in (1.0, 4.0) for row in accuracy(tokens, hidden, vocab, scale, 0, log)]
    timings = cost(rows, hidden, vocab, timing, log)
    print(f"\n{'variant':16} {'scale':>5} {'max |dlogp|':>11} {'mean |dlogp|':>12} {'max |dp|':>9} {'corr-1':>9} "
          f"{'fwd ms':>7} {'TF/s':>5} {'f+b ms':>7} {'TF/s':>5}")
    flops = 2.0 * rows * hidden * vocab
    for row in acc:
        fwd, both = timings[row["variant"]]
        print(f"{row['variant']:16} {row['scale']:5.0f} {row['logprob_err_max']:11.2e} {row['logprob_err_mean']:12.2e} "
              f"{row['prob_err_max']:9.2e} {1 - row['token_prob_corr']:9.1e} {fwd * 1e3:7.2f} "
              f"{flops / fwd / 1e12:5.0f} {both * 1e3:7.2f} {3 * flops / both / 1e12:5.0f}")
    return acc


if __name__ == "__main__":
    main()
