"""Where the time of a step other than training goes: the hybrid ablation's population step, the serving engine's
decode call, the static batch decode loop and batch-1 decode, each traced with jax.profiler and summed per HLO op.

    PYTHONPATH=. python3 benchmarks/step_profile.py [--targets ablation,engine,static,decode1] [--smoke]

The trace parser, categories and op attribution are benchmarks/train_profile.py's (`HloIndex`, `analyse`): kernels
are mapped to their HLO instruction and its jax/flax name scope. Command buffers are turned off for the whole
process (XLA_FLAGS `--xla_gpu_enable_command_buffer=`) so that every kernel keeps its annotation; the untraced
timings are of that same configuration.

Targets (hf-bench model, bf16, random weights, for the inference ones):
  ablation  experiments/hybrid_ablation arm "1" (8 layers, width 128, T 128, 9 members vmapped): ms per population
            step at 64 and 256 rows per member, and at 64 rows with the pure-JAX lightning path instead of Pallas;
            trace of one 20-step chunk at 64 rows
  engine-phases   the same load untraced: the scheduler thread's time per phase, device_get waits, occupancy
  engine    m1jax.serve Batcher under benchmarks/serve.py's 64-client load (prompts of 512, 256 output tokens,
            K = 16): tokens/s in a 1.5 s window, then a traced window (device time per output token)
  static    m1jax.inference.engine.decode at batch 64 after a 512-token prefill: 128 steps traced
  decode1   the same at batch 1 over a 2,048-token prefill: 64 steps traced
Writes $OUT/step_profile.jsonl; prints each target's top ops and category table, and a summary table last.
"""
import argparse
import gzip
import glob
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.train_profile import CATEGORIES, HloIndex, analyse  # noqa: E402

OUT = os.environ.get("OUT", ".")
LOG = os.path.join(OUT, "step_profile.jsonl")
SUMMARY: list[dict] = []


def log(**record):
    with open(LOG, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "profile"}, default=str)[:600], flush=True)


def traced(run, text: str, steps: int, label: str) -> dict | None:
    """Run `run()` (returns arrays) inside a profiler trace; analyse per `steps` units. None if the trace fails."""
    index = HloIndex(text)
    trace_dir = tempfile.mkdtemp(prefix="m1jax_step_trace_")
    try:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            start = time.perf_counter()
            jax.block_until_ready(run())
            wall_ms = 1e3 * (time.perf_counter() - start)
        paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True))
        with gzip.open(paths[-1], "rt") as f:
            result = analyse(json.load(f), index, steps, wall_ms / steps)
    except Exception as err:  # noqa: BLE001 - the untraced timings still stand
        log(target=label, what="trace failed", error=f"{type(err).__name__}: {str(err)[:600]}")
        return None
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
    log(target=label, what="profile", profile=result)
    print(f"\n-- {label}: traced {result['wall_ms']:.3f} ms per unit, busy {result['busy_ms']:.3f}; top ops:")
    for row in result["top_ops"][:20]:
        print(f"  {row['ms_per_step']:8.4f}  {row['category']:22s} {row['hlo_op'][:30]:30s} {row['op_name'][-100:]}")
    print("  the same ops by where they sit in the model (layer numbers dropped):")
    for (cat, where), (ms, count) in op_families(result["top_ops"])[:25]:
        print(f"  {ms:8.4f}  {count:4d} ops  {cat:22s} {where[-90:]}")
    for cat in list(CATEGORIES) + sorted(set(result["per_step_ms"]) - set(CATEGORIES)):
        ms = result["per_step_ms"].get(cat, 0.0)
        if ms:
            print(f"  {cat:24s} {ms:9.4f} ms  {result['kernels_per_step'].get(cat, 0):6.0f} kernels")
    print(f"  {'idle (wall - busy)':24s} {result['wall_ms'] - result['busy_ms']:9.4f} ms", flush=True)
    return result


def op_families(top_ops: list[dict]) -> list[tuple[tuple[str, str], tuple[float, int]]]:
    """top_ops summed by (category, op_name without the jit/while prefix and layer numbers), costliest first: e.g. the
    8 layers' "moe/router/dot_general" in one row."""
    families: dict[tuple[str, str], list] = {}
    for row in top_ops:
        where = re.sub(r"layer_\d+", "layer_*", row["op_name"].split("/M1ForCausalLM/")[-1])
        total = families.setdefault((row["category"], where), [0.0, 0])
        total[0] += row["ms_per_step"]
        total[1] += 1
    return sorted(((key, (ms, n)) for key, (ms, n) in families.items()), key=lambda item: -item[1][0])


# ----- targets -----
def target_ablation(smoke: bool):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                                    "hybrid_ablation"))

    import recall
    from run import SIZES, make_arms

    from m1jax.config import RunPolicy
    size = SIZES["cpu" if smoke else "gpu"]
    arm = make_arms(size)["1" if not smoke else "1"]
    config = recall.arm_config(arm, size["width"], size["recipe"]["vocab"])
    policy = RunPolicy(compute_dtype=size["compute_dtype"], param_dtype="float32")
    lrs = [lr for lr in size["lrs"] for _ in size["seeds"]]
    seeds = [s for _ in size["lrs"] for s in size["seeds"]]
    chunk = 2 if smoke else 20
    variants = [("pallas", 64), ("pallas", 256), ("chunked", 64)] if not smoke else [("auto", 8), ("chunked", 8)]
    for impl, rows in variants:
        recall.use_lightning_impl(impl)
        recipe = recall.Recipe(**dict(size["recipe"], batch_size=rows, chunk=chunk, steps=10 * chunk))
        pop = recall.Population(config, recipe, lrs, seeds, policy)
        params, opt_state = pop.init()
        begin = time.perf_counter()
        params, opt_state, loss = pop.train_chunk(params, opt_state, 0)
        loss.block_until_ready()
        compile_s = time.perf_counter() - begin
        times = []
        for i in range(3):
            begin = time.perf_counter()
            params, opt_state, loss = pop.train_chunk(params, opt_state, (i + 1) * chunk)
            loss.block_until_ready()
            times.append(time.perf_counter() - begin)
        ms = 1e3 * statistics.median(times) / chunk
        row = dict(target="ablation", variant=f"{impl}, {rows} rows/member", members=len(lrs), ms_per_unit=ms,
                   unit="population step", rows_per_s=len(lrs) * rows / ms * 1e3, compile_s=compile_s)
        log(what="timing", **row)
        SUMMARY.append(row)
        if (impl, rows) == variants[0]:
            text = pop._chunk.lower(params, opt_state, jnp.int32(0), jnp.float32(recipe.steps)).compile().as_text()
            state = {"p": params, "o": opt_state}

            def run():
                state["p"], state["o"], out = pop.train_chunk(state["p"], state["o"], 4 * chunk)
                return out
            traced(run, text, chunk, f"ablation ({impl}, {rows} rows/member)")
            params, opt_state = state["p"], state["o"]


def _hf(smoke: bool):
    from benchmarks.common import config_for, policy_for, random_params
    from m1jax import M1ForCausalLM
    name = "smoke" if smoke else "hf-bench"
    config, policy = config_for(name), policy_for(name)
    params = random_params(config, policy=policy)
    return config, M1ForCausalLM(config, policy=policy), params


PHASES = ("_step_all", "_drop_cancelled", "_begin_group", "_prefill_step", "_try_insert", "_launch", "_read",
          "_read_first", "_end_rows", "_release")


def instrument(batcher) -> dict:
    """Wrap the batcher's phases (on this instance) and jax.device_get with wall-clock counters: {name: [calls,
    seconds]} (inclusive: a phase's time includes the phases it calls), plus "occupancy" (busy slots summed over
    launches). Call the returned dict's "undo"() to restore."""
    stats = {name: [0, 0.0] for name in PHASES + ("device_get",)}
    stats["occupancy"] = [0, 0.0]

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                stats[name][0] += 1
                stats[name][1] += time.perf_counter() - begin
        return wrapper
    for name in PHASES:
        setattr(batcher, name, timed(name, getattr(batcher, name)))
    launch = batcher._launch

    def counted_launch():
        stats["occupancy"][0] += 1
        stats["occupancy"][1] += batcher.busy_slots
        return launch()
    batcher._launch = counted_launch
    device_get = jax.device_get
    jax.device_get = timed("device_get", device_get)

    def undo():
        jax.device_get = device_get
        for name in PHASES:
            batcher.__dict__.pop(name, None)
    stats["undo"] = undo
    return stats


def target_engine(smoke: bool, trace: bool = True):
    """benchmarks/serve.py's 64-client workload (each client sends requests back to back: prefills interleave with
    decode calls, as in the measured 45.6%): tokens/s and the scheduler thread's time per phase in a window of its
    steady state, then (trace=True) a traced window."""
    from m1jax.serve import steps
    from m1jax.serve.batcher import Batcher, Job
    config, model, params = _hf(smoke)
    slots, prompt, output, k = (4, 24, 6, 4) if smoke else (64, 512, 256, 16)
    context = -(-(prompt + 2 * output) // 64) * 64
    batcher = Batcher(model, params, lambda ids: "", max_batch=slots, max_context=context, chunk_size=512 if not
                      smoke else 16, max_queue=4096, decode_steps=k, prefill_batch=16 if not smoke else 2)
    batcher.warm_up(prompt)
    text = steps.JITTED["decode"].lower(batcher._model(None), None, k, params, batcher.slots).compile().as_text() \
        if trace else ""
    stamps: list[float] = []
    stop = threading.Event()

    def client(seed):
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            job = Job(rng.integers(0, config.vocab_size, prompt).tolist(), output,
                      on_event=lambda kind, data: stamps.extend([time.perf_counter()] *
                                                                len(data.get("token_ids", ()))))
            batcher.submit(job)
            job.done.wait()
    batcher.start_thread()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(slots)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0 if smoke else 4.0)  # past the first admissions
        window = 0.5 if smoke else 1.5
        stats = instrument(batcher)
        begin = time.perf_counter()
        time.sleep(window)
        end = time.perf_counter()
        stats.pop("undo")()
        tokens = sum(begin <= t < end for t in list(stamps))
        calls, busy = stats.pop("occupancy")
        log(target="engine", what="scheduler phases", window_s=window, tokens=tokens,
            mean_busy_slots=busy / max(calls, 1), phases={n: {"calls": c, "ms": 1e3 * t} for n, (c, t) in stats.items()})
        print(f"\n-- engine scheduler thread over {window} s: {tokens} tokens, {calls} decode launches, mean busy slots "
              f"{busy / max(calls, 1):.1f} of {slots}")
        for name, (count, seconds) in stats.items():
            print(f"  {name:16s} {count:6d} calls {1e3 * seconds:9.1f} ms ({100 * seconds / window:5.1f}% of the "
                  f"window, inclusive)")
        ms = 1e3 * window / max(tokens, 1)
        row = dict(target="engine", variant=f"{slots} clients, K {k}", ms_per_unit=ms * slots,
                   unit="ms x slots / token", rows_per_s=tokens / window)
        log(what="timing", tokens_in_window=tokens, **row)
        SUMMARY.append(row)
        if not trace:
            return
        box = {}

        def run():
            box["before"] = len(stamps)
            time.sleep(window)
            box["after"] = len(stamps)
            return jnp.zeros(())
        result = traced(run, text, 1, f"engine ({slots} clients, K {k}), one {window} s window")
        if result:
            traced_tokens = max(box["after"] - box["before"], 1)
            log(target="engine", what="traced per token", tokens=traced_tokens,
                per_token_ms={c: v / traced_tokens for c, v in result["per_step_ms"].items()},
                busy_ms_per_token=result["busy_ms"] / traced_tokens)
    finally:
        stop.set()
        batcher.stop(timeout=60)


def _decode_target(smoke: bool, batch: int, context: int, steps: int, label: str):
    from benchmarks.inference import ours_decode, random_prompts
    from m1jax.inference import engine
    from m1jax.inference.engine import Request, Timings
    config, model, params = _hf(smoke)
    request = Request(max_new_tokens=steps, chunk_size=context)
    ms = ours_decode(model, params, batch, context, steps, reps=2)["ms_per_token"]  # benchmarks/inference.py's timing
    row = dict(target=label, variant=f"batch {batch}, context {context}", ms_per_unit=ms, unit="decode step",
               rows_per_s=batch / ms * 1e3)
    log(what="timing", **row)
    SUMMARY.append(row)
    state = engine.prefill(model, params, engine.start(config, random_prompts(config, batch, context), request,
                                                        policy=model.policy), request, timings=Timings())
    # the compiled decode loop's text (engine.decode compiles ahead of time and keeps the executable), for op names
    text = "\n".join(c.as_text() for key, c in engine._COMPILED.items() if key[0] == "decode")
    box = {"s": state}

    def run():
        box["s"] = engine.decode(model, params, box["s"], request, timings=Timings())
        return box["s"].num_generated
    traced(run, text, steps, f"{label} (batch {batch}, context {context})")


TARGETS = {
    "ablation": target_ablation,
    "engine": target_engine,
    "engine-phases": lambda smoke: target_engine(smoke, trace=False),
    "static": lambda smoke: _decode_target(smoke, 4 if smoke else 64, 24 if smoke else 512, 8 if smoke else 128,
                                           "static"),
    "decode1": lambda smoke: _decode_target(smoke, 1, 32 if smoke else 2048, 8 if smoke else 64, "decode1"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    args = parser.parse_args(argv)
    os.makedirs(OUT, exist_ok=True)
    names = args.targets.split(",")
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise SystemExit(f"--targets: unknown {unknown}; choose from {list(TARGETS)}")
    log(what="setup", device=jax.devices()[0].device_kind, jax=jax.__version__, targets=names,
        xla_flags=os.environ["XLA_FLAGS"], date=time.strftime("%Y-%m-%d %H:%M"))
    failed = 0
    for name in names:
        try:
            TARGETS[name](args.smoke)
        except Exception as err:  # noqa: BLE001 - the other targets still run
            failed += 1
            log(target=name, what="failed", error=f"{type(err).__name__}: {str(err)[:800]}")
    print(f"\n== step profile summary ({jax.devices()[0].device_kind})")
    print(f"{'target':18s} {'variant':34s} {'ms/unit':>9s} {'unit':18s} {'rows/s':>10s}")
    for r in SUMMARY:
        print(f"{r['target']:18s} {r['variant']:34s} {r['ms_per_unit']:9.3f} {r['unit']:18s} "
              f"{r.get('rows_per_s', 0):10,.0f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
