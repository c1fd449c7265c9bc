"""Inference on one GPU: prefill and decode against transformers' MiniMaxForCausalLM, and a 1M-token context.

Run on the GPU machine (one call, one card, ~5-8 minutes):
    PYTHONPATH=. python3 benchmarks/inference.py [--out DIR] [--sections hf,transformers,long,sweep]
    PYTHONPATH=. python3 benchmarks/inference.py --smoke      # tiny sizes on the CPU, no torch needed

Sections, in this order (each runs on its own; a failure is logged and the rest go on; results are appended to
the log as they come, so a time-out keeps what was measured):
  hf            the "hf-bench" shape (hidden 1024, 8 layers at 7:1, 16 heads x 64, 4 kv heads, 8 experts x
                1536 top-2, vocab 32000, bf16): prefill tokens/s at 2K and 8K (batch 1, one chunk, last logits
                only), decode ms/token at batch 1 with a 2K context, decode tokens/s at batch 64
  transformers  the same shape in transformers' MiniMaxForCausalLM (random weights, bf16, sdpa attention, else
                eager), same card, same call: prefill = forward with logits_to_keep=1; decode = (generate N+1
                tokens - generate 1 token) / N, greedy, no eos
  long          "research-1b" (bf16 weights): a 1,048,576-token prompt prefilled in chunks of --chunk tokens
                (time; peak device memory from jax.devices()[0].memory_stats(), which is the process's peak so
                far, and the bytes in use around the prefill), then decode ms/token at 1M and at 2K context
  sweep         "research-1b" decode ms/token at batch 1 against the context length (caches of random
                contents: a decode step's cost depends on the cache size, not its values), for the plot
  split         (not in the default list) "research-1b" decode at batch 1 over synthetic caches of the sweep's
                lengths, with the softmax layer's one-query attention dense and split-KV
                (softmax_attention.DECODE_SPLIT_MIN_SLOTS set to None, then 0 for every cache; the shipped
                threshold is put back), and the 1M / 2K ratio of each

Method: random weights (N(0, 0.02), norm scales 1, the router float32), random prompts. Our steps are compiled
ahead of time (compile time reported apart); every figure is the median of 3 runs after one warm-up.
Decode is the engine's jitted while-loop (one call for all steps), timed around block_until_ready.
Writes $OUT/inference.jsonl (one JSON line per measurement, as it goes), $OUT/inference_table.md and
$OUT/inference_decode_latency.svg (+ .png when matplotlib is there); prints the table last.
"""
import argparse
import gc
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for torch on the same card

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import RunLog, config_for, policy_for, random_params, say  # noqa: E402
from m1jax import M1Config, M1ForCausalLM  # noqa: E402
from m1jax.inference import engine  # noqa: E402
from m1jax.inference.cache import cache_bytes  # noqa: E402
from m1jax.inference.engine import Request, Timings  # noqa: E402

SIZES = {  # the issue's sizes, and --smoke's stand-ins
    "full": dict(hf="hf-bench", long="research-1b", prefill=(2048, 8192), context=2048, big_batch=64, steps=64,
                 long_context=1 << 20, chunk=8192, sweep=(2048, 8192, 32768, 131072, 1 << 20), reps=3),
    "smoke": dict(hf="smoke", long="smoke", prefill=(40,), context=40, big_batch=2, steps=3, long_context=300,
                  chunk=150, sweep=(40, 300), reps=1),
}
LOG = RunLog(os.path.join(os.environ.get("OUT", "."), "inference.jsonl"))
RESULTS, record = LOG.rows, LOG


def memory(stat: str) -> int | None:
    """A device memory statistic (None where the backend keeps none, e.g. the CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get(stat)


def random_prompts(config: M1Config, batch: int, length: int, seed: int = 1) -> list[list[int]]:
    return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length)).tolist()


# ----- ours -----
def ours_prefill(model, params, batch: int, length: int, reps: int) -> dict:
    """The engine's prefill of the whole prompt in one chunk (last logits only), from an empty cache."""
    config = model.config
    request = Request(max_new_tokens=1, chunk_size=length)
    prompts = random_prompts(config, batch, length)
    seconds, compile_s = [], 0.0
    for rep in range(reps + 1):
        timings = Timings()
        state = engine.start(config, prompts, request, policy=model.policy)
        state = engine.prefill(model, params, state, request, timings=timings)
        compile_s += timings.compile_seconds
        if rep:  # the first run warms up
            seconds.append(timings.prefill_seconds)
        del state
    median = statistics.median(seconds)
    return dict(seconds=median, tokens_per_s=batch * length / median, compile_s=compile_s)


def ours_decode(model, params, batch: int, context: int, steps: int, reps: int, chunk: int | None = None) -> dict:
    """Prefill `context` tokens, then time `steps` decode steps (one compiled while-loop); median over reps."""
    config = model.config
    request = Request(max_new_tokens=steps, chunk_size=chunk or context)
    prompts = random_prompts(config, batch, context)
    per_step = []
    for rep in range(reps + 1):
        timings = Timings()
        state = engine.start(config, prompts, request, policy=model.policy)
        state = engine.prefill(model, params, state, request, timings=timings)
        state = engine.decode(model, params, state, request, timings=timings)
        assert int(state.num_generated) == steps
        if rep:  # the first run warms up
            per_step.append(timings.decode_seconds / steps)
        del state
    ms = 1e3 * statistics.median(per_step)
    return dict(ms_per_token=ms, tokens_per_s=batch * 1e3 / ms)


def synthetic_decode(model, params, context: int, steps: int, reps: int, batch: int = 1) -> dict:
    """Decode latency (ms per step of `batch` rows) over a cache that already holds `context` slots of random
    contents in every row."""
    config = model.config
    request = Request(max_new_tokens=steps, chunk_size=context)

    @jax.jit
    def fill(cache, key):
        def draw(path, x):
            k = jax.random.fold_in(key, hash(jax.tree_util.keystr(path)) % (1 << 30))
            scale = 1e-3 if x.dtype == jnp.float32 else 1.0  # lightning states small, keys/values unit
            return (scale * jax.random.normal(k, x.shape)).astype(x.dtype)
        return cache.replace(layers=jax.tree_util.tree_map_with_path(draw, cache.layers), index=jnp.int32(context))

    per_step = []
    for rep in range(reps + 1):
        # decode donates the state: a fresh one per run
        state = engine.start(config, [[0] * context] * batch, request, policy=model.policy)
        state = state.replace(cache=fill(state.cache, jax.random.key(rep)),
                              last_logits=jax.random.normal(jax.random.key(rep), state.last_logits.shape))
        timings = Timings()
        state = engine.decode(model, params, state, request, timings=timings)
        if rep:
            per_step.append(timings.decode_seconds / steps)
        del state
    ms = 1e3 * statistics.median(per_step)
    return dict(ms_per_token=ms, tokens_per_s=batch * 1e3 / ms)


def section_long(size: dict) -> None:
    config, policy = config_for(size["long"]), policy_for(size["long"])
    params = random_params(config, policy=policy)
    context, chunk, steps = size["long_context"], size["chunk"], size["steps"]
    model = M1ForCausalLM(config, policy)
    request = Request(max_new_tokens=steps, chunk_size=chunk)
    timings = Timings()
    peak_before, in_use_before = memory("peak_bytes_in_use"), memory("bytes_in_use")
    state = engine.start(config, random_prompts(config, 1, context), request, policy=policy)
    state = engine.prefill(model, params, state, request, timings=timings)
    record(section="long", what="prefill", config=size["long"], context=context, chunk=chunk,
           seconds=timings.prefill_seconds, tokens_per_s=context / timings.prefill_seconds,
           compile_s=timings.compile_seconds, peak_bytes=memory("peak_bytes_in_use"), peak_bytes_before=peak_before,
           bytes_in_use_before=in_use_before, bytes_in_use_after=memory("bytes_in_use"),
           cache_bytes=cache_bytes(config, 1, context + steps, policy=policy))
    timings = Timings()
    state = engine.decode(model, params, state, request, timings=timings)
    record(section="long", what="decode after the long prefill (first run, compile excluded)", config=size["long"],
           context=context, ms_per_token=1e3 * timings.decode_seconds / steps)
    del state
    gc.collect()
    long_decode = synthetic_decode(model, params, context, steps, size["reps"])
    short_decode = ours_decode(model, params, 1, size["context"], steps, size["reps"])
    record(section="long", what="decode batch 1", config=size["long"], context=context, **long_decode)
    record(section="long", what="decode batch 1", config=size["long"], context=size["context"], **short_decode)
    record(section="long", what="decode latency ratio", config=size["long"],
           ratio=long_decode["ms_per_token"] / short_decode["ms_per_token"], target="<= 2")


def section_sweep(size: dict) -> None:
    model = M1ForCausalLM(config_for(size["long"]), policy_for(size["long"]))
    params = random_params(model.config, policy=model.policy)
    for context in size["sweep"]:
        record(section="sweep", what="decode batch 1", config=size["long"], context=context,
               **synthetic_decode(model, params, context, size["steps"], size["reps"]))
        gc.collect()


def section_split(size: dict) -> None:
    from m1jax.layers import softmax_attention
    model = M1ForCausalLM(config_for(size["long"]), policy_for(size["long"]))
    params = random_params(model.config, policy=model.policy)
    shipped = softmax_attention.DECODE_SPLIT_MIN_SLOTS
    try:
        for form, threshold in (("dense", None), ("split", 0)):
            softmax_attention.DECODE_SPLIT_MIN_SLOTS = threshold  # read when the decode step is traced:
            jax.clear_caches()  # no step compiled under the other form may be reused
            engine._COMPILED.clear()
            for context in size["sweep"]:
                record(section="split", what="decode batch 1", attention=form, config=size["long"], context=context,
                       **synthetic_decode(model, params, context, size["steps"], size["reps"]))
                gc.collect()
    finally:
        softmax_attention.DECODE_SPLIT_MIN_SLOTS = shipped
        jax.clear_caches()
        engine._COMPILED.clear()


def section_hf(size: dict) -> None:
    model = M1ForCausalLM(config_for(size["hf"]), policy_for(size["hf"]))
    params = random_params(model.config, policy=model.policy)
    for length in size["prefill"]:
        record(section="hf", what="prefill", config=size["hf"], batch=1, length=length,
               **ours_prefill(model, params, 1, length, size["reps"]))
    for batch in (1, size["big_batch"]):
        record(section="hf", what="decode", config=size["hf"], batch=batch, context=size["context"],
               **ours_decode(model, params, batch, size["context"], size["steps"], size["reps"]))
        gc.collect()


# ----- transformers -----
def section_transformers(size: dict) -> None:
    try:
        import torch
        from transformers import MiniMaxConfig, MiniMaxForCausalLM
    except ImportError as err:
        record(section="transformers", what="skipped", reason=f"{type(err).__name__}: {err}")
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    raw = {k: v for k, v in config_for(size["hf"]).to_hf().items() if k not in ("m1jax", "dtype")}
    model = None
    for attention in ("sdpa", "eager"):
        try:
            hf_config = MiniMaxConfig(**{**raw, "attn_implementation": attention})
            model = MiniMaxForCausalLM(hf_config).to(device=device, dtype=torch.bfloat16).eval()
            break
        except Exception as err:  # an attention kind this build lacks: try the next
            say(f"transformers with attn_implementation={attention} failed: {type(err).__name__}: {err}")
    if model is None:
        record(section="transformers", what="skipped", reason="no attention implementation loaded")
        return

    def timed(fn):
        def run():
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
        run()
        samples = []
        for _ in range(size["reps"]):
            begin = time.perf_counter()
            run()
            samples.append(time.perf_counter() - begin)
        return statistics.median(samples)

    def ids(batch, length):
        return torch.randint(0, raw["vocab_size"], (batch, length), device=device)

    with torch.no_grad():
        for length in size["prefill"]:
            prompt = ids(1, length)
            seconds = timed(lambda: model(input_ids=prompt, use_cache=True, logits_to_keep=1))
            record(section="transformers", what="prefill", batch=1, length=length, seconds=seconds,
                   tokens_per_s=length / seconds, attention=model.config._attn_implementation)
        steps = size["steps"]
        for batch in (1, size["big_batch"]):
            prompt = ids(batch, size["context"])
            kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, eos_token_id=None,
                          pad_token_id=0, use_cache=True)
            one = timed(lambda: model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kwargs))
            many = timed(lambda: model.generate(prompt, max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                                                **kwargs))
            ms = 1e3 * (many - one) / steps
            record(section="transformers", what="decode", batch=batch, context=size["context"], ms_per_token=ms,
                   tokens_per_s=batch * 1e3 / ms)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


# ----- report -----
def find(section: str, what: str, **keys) -> dict | None:
    for row in RESULTS:
        if row.get("section") == section and row.get("what") == what and all(row.get(k) == v
                                                                              for k, v in keys.items()):
            return row
    return None


def table(size: dict) -> str:
    lines = ["| measure | ours | transformers | ratio | target |", "|---|---|---|---|---|"]

    def add(label, ours, theirs, key, higher_is_better, target):
        a, b = (ours or {}).get(key), (theirs or {}).get(key)
        ratio = (a / b if higher_is_better else b / a) if a and b else None
        fmt = lambda x: "" if x is None else f"{x:,.1f}" if x >= 10 else f"{x:.3f}"
        lines.append(f"| {label} | {fmt(a)} | {fmt(b)} | {'' if ratio is None else f'{ratio:.1f}x'} | {target} |")

    for length in size["prefill"]:
        add(f"{size['hf']} prefill tok/s, T={length}", find("hf", "prefill", length=length),
            find("transformers", "prefill", length=length), "tokens_per_s", True, ">= 5x")
    add(f"{size['hf']} decode ms/token, batch 1, context {size['context']}",
        find("hf", "decode", batch=1), find("transformers", "decode", batch=1), "ms_per_token", False, ">= 20x")
    add(f"{size['hf']} decode tok/s, batch {size['big_batch']}", find("hf", "decode", batch=size["big_batch"]),
        find("transformers", "decode", batch=size["big_batch"]), "tokens_per_s", True, "")
    prefill = find("long", "prefill")
    if prefill:
        peak = prefill.get("peak_bytes")
        lines.append(f"| {size['long']} prefill of {prefill['context']:,} tokens (chunk {prefill['chunk']}) | "
                     f"{prefill['seconds']:.1f} s, {prefill['tokens_per_s']:,.0f} tok/s, peak "
                     f"{'n/a' if peak is None else f'{peak / 2**30:.1f} GiB'} | | | |")
    ratio = find("long", "decode latency ratio")
    if ratio:
        lines.append(f"| {size['long']} decode ms/token at {size['long_context']:,} vs {size['context']:,} context "
                     f"| {ratio['ratio']:.2f}x | | | <= 2x |")
    for form in ("dense", "split"):
        short_row, long_row = (find("split", "decode batch 1", attention=form, context=c)
                               for c in (size["context"], size["long_context"]))
        if short_row and long_row:
            lines.append(f"| {size['long']} decode ms/token, synthetic caches, {form} one-query attention: "
                         f"{size['long_context']:,} vs {size['context']:,} | {long_row['ms_per_token']:.3f} vs "
                         f"{short_row['ms_per_token']:.3f}: {long_row['ms_per_token'] / short_row['ms_per_token']:.2f}x"
                         " | | | <= 2x |")
    for section, forms in (("sweep", (None,)), ("split", ("dense", "split"))):
        rows = {form: [r for r in RESULTS if r.get("section") == section and "ms_per_token" in r
                       and r.get("attention") == form] for form in forms}
        if rows[forms[0]]:
            lines.append("")
            lines.append("| context | " + " | ".join(f"{r['context']:,}" for r in rows[forms[0]]) + " |")
            lines.append("|---|" + "---|" * len(rows[forms[0]]))
            for form in forms:
                lines.append(f"| decode ms/token{f', {form}' if form else ''} | "
                             + " | ".join(f"{r['ms_per_token']:.3f}" for r in rows[form]) + " |")
    return "\n".join(lines)


def short(n: int) -> str:
    """1048576 -> '1M', 8192 -> '8K', 300 -> '300'."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n / size:g}{unit}"
    return str(n)


def plot(out_dir: str) -> list[str]:
    """Decode latency against context (log x): an SVG always, a PNG when matplotlib is importable."""
    points = sorted((r["context"], r["ms_per_token"]) for r in RESULTS
                    if r.get("section") == "sweep" and "ms_per_token" in r)
    if not points:
        return []
    written = []
    width, height, pad = 640, 360, 60
    xs, ys = np.log2([p[0] for p in points]), [p[1] for p in points]
    x_of = lambda x: pad + (x - xs.min()) / max(xs.max() - xs.min(), 1e-9) * (width - 2 * pad)
    y_top = max(ys) * 1.15
    y_of = lambda y: height - pad - y / y_top * (height - 2 * pad)
    path = " ".join(f"{x_of(x):.1f},{y_of(y):.1f}" for x, y in zip(xs, ys))
    labels = "".join(f'<text x="{x_of(x):.1f}" y="{height - pad + 18}" font-size="11" text-anchor="middle">'
                     f'{short(c)}</text><circle cx="{x_of(x):.1f}" cy="{y_of(y):.1f}" r="3"/>'
                     f'<text x="{x_of(x):.1f}" y="{y_of(y) - 8:.1f}" font-size="10" text-anchor="middle">'
                     f'{y:.2f}</text>' for x, y, c in zip(xs, ys, [p[0] for p in points]))
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">'
           f'<rect width="100%" height="100%" fill="white"/>'
           f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>'
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>'
           f'<polyline points="{path}" fill="none" stroke="steelblue" stroke-width="2"/>{labels}'
           f'<text x="{width / 2}" y="{height - 15}" font-size="12" text-anchor="middle">context (tokens, log scale)'
           f'</text><text x="15" y="{height / 2}" font-size="12" transform="rotate(-90 15 {height / 2})" '
           f'text-anchor="middle">decode ms/token (batch 1)</text></svg>')
    svg_path = os.path.join(out_dir, "inference_decode_latency.svg")
    with open(svg_path, "w") as f:
        f.write(svg)
    written.append(svg_path)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p[0] for p in points], ys, marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode ms/token (batch 1)")
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    png_path = os.path.join(out_dir, "inference_decode_latency.png")
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return written + [png_path]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, a minute); torch parts skip if absent")
    parser.add_argument("--sections", default="hf,transformers,long,sweep",
                        help="comma list of: long, sweep, hf, transformers, split")
    parser.add_argument("--chunk", type=int, help="prefill chunk of the long prompt (default 8192)")
    args = parser.parse_args(argv)
    size = dict(SIZES["smoke" if args.smoke else "full"])
    if args.chunk:
        size["chunk"] = args.chunk
    os.makedirs(args.out, exist_ok=True)
    LOG.path = os.path.join(args.out, "inference.jsonl")
    RESULTS.clear()
    sections = {"long": section_long, "sweep": section_sweep, "hf": section_hf, "transformers": section_transformers,
                "split": section_split}
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(sections))
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; choose from {sorted(sections)}")
    device = jax.devices()[0]
    record(section="setup", what="device", device=str(device.device_kind), backend=jax.default_backend(),
           jax=jax.__version__, date=time.strftime("%Y-%m-%d"), argv=sys.argv[1:] if argv is None else list(argv))
    failures = 0
    for name in chosen:
        begin = time.perf_counter()
        try:
            sections[name](size)
        except Exception as err:  # one failing section must not hide the others' figures
            failures += 1
            record(section=name, what="failed", error=f"{type(err).__name__}: {str(err)[:500]}")
            traceback.print_exc()
        say(f"== section {name}: {time.perf_counter() - begin:.1f} s")
        gc.collect()
    text = table(size)
    with open(os.path.join(args.out, "inference_table.md"), "w") as f:
        f.write(text + "\n")
    for path in plot(args.out):
        say(f"wrote {path}")
    say(f"\n== inference on {device.device_kind} ({jax.default_backend()})\n{text}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
