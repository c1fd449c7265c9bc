"""Serving on one GPU: continuous batching (m1jax.serve) at 1, 16 and 64 concurrent clients, against the static
batch-64 decode of m1jax.generate and transformers' static batched generate, in the same call.

Run on the GPU machine (one call, one card, ~5-8 minutes):
    PYTHONPATH=. python3 benchmarks/serve.py [--out DIR] [--http] [--decode-steps 8,16] [--prefill-batch 16]
    PYTHONPATH=. python3 benchmarks/serve.py --smoke       # tiny sizes on the CPU, no torch needed

Workload: the "hf-bench" shape (bf16, random weights N(0, 0.02)), prompts of 512 random tokens, 256 output tokens
each, greedy, no eos (every request runs its full length). Each client sends its requests one after another;
at concurrency c there are max(2c, 8) requests in all.
  engine         clients call the Batcher in-process, driven by one thread as an HTTP front end is by one event loop
                 (no HTTP: fastapi/uvicorn need not be installed), once for each --decode-steps K (decode steps per
                 device call; tokens reach the host every K steps)
  http           with --http and fastapi + uvicorn + httpx importable: the same through the OpenAI /v1/completions
                 route, streamed, from asyncio clients on loopback in a process of their own
                 (benchmarks/http_load.py; before 2026-12-01 they shared the server's process), counting tokens
                 from the text (the benchmark detokenizes each token to one character), so no log-probabilities
                 are computed: the engine's workload; then "http+logprobs", the same asking `logprobs: 0`, which
                 makes every decode step compute the sampled token's log-probability and the top 20 over the
                 vocabulary (the HTTP figures before 2026-12-01, tenth session, were of that workload). The GPU
                 machine lacks fastapi and uvicorn: `make card-wheels` here, carry .whl, and start the call with
                 the install line it prints.
  static         m1jax.generate on 64 prompts at once (decode tokens/s of its jitted while-loop)
  transformers   MiniMaxForCausalLM (random weights, bf16) static batched generate on the same 64 requests; and
                 whether its continuous batching (`generate_batch`) accepts the model (it raised
                 "ValueError: Invalid group type: linear_attention" with transformers 5.17, 2026-11-29)
Figures: output tokens/s (all output tokens / wall time of the run), time to first token and inter-token latency
p50/p99 (per token, from the batcher's token events: with K steps per call the tokens of a call arrive together, so
ITL p50 is near 0 and p99 near a call's time), and time per output token p50/p99 ((last token - first token) /
(tokens - 1) per request). Target: engine at 64 clients >= 80% of static.
Writes $OUT/serve.jsonl as it goes, $OUT/serve_table.md and $OUT/serve_latency_throughput.png (matplotlib) and
prints the table last.
--timeline: also a timeline of the engine's scheduler turns in every engine run (m1jax.serve.timeline: prefill,
insert and decode calls, device waits, host work, idle), written to $OUT/timeline.jsonl (events, one "request" line
per request, a "summary" line per run), and the summary of the runs at the top concurrency printed after the table
(seconds per category, decode calls' occupancy, the gap from the last token of a wave to the next wave's first
decode call).
"""
import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for torch on the same card

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import RunLog, config_for, policy_for, random_params, say  # noqa: E402
from benchmarks.http_load import percentiles  # noqa: E402
from m1jax import M1Config, M1ForCausalLM  # noqa: E402
from m1jax.config import RunPolicy  # noqa: E402
from m1jax.inference.generate import generate  # noqa: E402
from m1jax.serve.batcher import Batcher, Job  # noqa: E402
from m1jax.serve.timeline import Timeline, summary_table  # noqa: E402

SIZES = {
    "full": dict(model="hf-bench", prompt=512, output=256, concurrency=(1, 16, 64), static_batch=64, chunk=512,
                 prefill_batch=16),
    "smoke": dict(model="smoke", prompt=24, output=6, concurrency=(1, 2, 4), static_batch=4, chunk=16,
                  prefill_batch=2),
}
LOG = RunLog(os.path.join(os.environ.get("OUT", "."), "serve.jsonl"))
RESULTS, record = LOG.rows, LOG


def prompts_for(config: M1Config, count: int, length: int, seed: int = 1) -> list[list[int]]:
    return np.random.default_rng(seed).integers(0, config.vocab_size, (count, length)).tolist()


# ----- ours: the batcher in-process -----
ROUTING = {"want_routing": True}  # --no-routing: requests without routing logs, as the OpenAI routes send them
TIMELINE = {"path": None, "printed": []}  # --timeline: $OUT/timeline.jsonl, and the summaries printed last


def run_engine(batcher: Batcher, prompts: list[list[int]], output: int, concurrency: int,
               timeline: Timeline | None = None) -> dict:
    """`concurrency` clients share the prompts; each sends its requests one after another. The clients are one
    driver (this thread), as an HTTP front end is one event loop: it sends every client's first request, then, as
    each request ends (its "done" event, queued by the scheduler thread), that client's next one. Token stamps are
    kept until the run ends. (Until 2026-12-01 each client was a thread of its own: 64 threads waking to submit
    held the GIL the scheduler needed, and spread a wave's arrivals over 11-23 ms; the HTTP section keeps real
    clients, in a process of their own.) With a timeline (attached to the batcher), it records the whole run."""
    waiting = [prompts[i::concurrency] for i in range(concurrency)]
    ended: queue.SimpleQueue = queue.SimpleQueue()
    finished: list[tuple[Job, list[float]]] = []
    errors: list[str] = []

    def send(client: int) -> bool:
        stamps: list[float] = []

        def on_event(kind, data):
            if kind == "done":
                ended.put((client, job, stamps))
            else:  # a decode call's tokens of this request arrive in one event: one stamp per token
                stamps.extend([time.perf_counter()] * len(data.get("token_ids", ())))

        job = Job(waiting[client].pop(0), output, on_event=on_event, **ROUTING)
        try:
            batcher.submit(job)
        except Exception as error:  # QueueFull, or a request the batcher refuses
            errors.append(repr(error))
            return False
        return True

    begin = time.perf_counter() if timeline is None else timeline.begin()
    outstanding = sum(send(client) for client in range(concurrency) if waiting[client])
    while outstanding:
        try:
            client, job, stamps = ended.get(timeout=300)
        except queue.Empty:
            raise RuntimeError(f"no request ended in 300 s ({outstanding} outstanding): the batcher stalled") from None
        outstanding -= 1
        if job.error is not None:
            errors.append(job.error)
            continue
        finished.append((job, stamps))
        if waiting[client]:
            outstanding += send(client)
    wall = time.perf_counter() - begin
    if timeline is not None:
        timeline.end(begin + wall)
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed; the first: {errors[0]}")
    ttft = [stamps[0] - job.arrival for job, stamps in finished]
    itl = [gap for _, stamps in finished for gap in np.diff(stamps).tolist()]
    tpot = [(s[-1] - s[0]) / (len(s) - 1) for _, s in finished if len(s) > 1]
    tokens = sum(len(job.token_ids) for job, _ in finished)
    return {"requests": len(prompts), "output_tokens": tokens, "seconds": wall, "output_tokens_per_s": tokens / wall,
            "ttft_ms": percentiles(ttft), "itl_ms": percentiles(itl), "tpot_ms": percentiles(tpot)}


def one_char(ids) -> str:
    """The benchmark's detokenizer: one character per token, so HTTP clients count tokens from the streamed text."""
    return "x" * len(ids)


def run_http(batcher: Batcher, prompts: list[list[int]], output: int, concurrency: int, logprobs: bool) -> dict:
    """The same through HTTP (/v1/completions, streamed): the server in a thread here, the clients
    (benchmarks/http_load.py) in a process of their own. Without `logprobs` the clients count tokens from the text
    (the engine's workload); with it they ask for log-probabilities, which every decode step then computes (the
    sampled token's and the top 20 over the vocabulary)."""
    import uvicorn

    from m1jax.serve.app import Server, build_app
    from m1jax.tokenizer import ByteTokenizer

    class Ids(ByteTokenizer):  # the prompts are ids already; text is one character per token (one_char)
        vocab_size = batcher.config.vocab_size

        def decode(self, ids):
            return one_char(ids)
    server = Server(batcher, Ids(), model_name="bench", request_timeout=None)
    server.ready = True
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    web = uvicorn.Server(uvicorn.Config(build_app(server), host="127.0.0.1", port=port, log_level="warning",
                                        lifespan="off"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    while not web.started:
        time.sleep(0.05)
    try:  # the clients run in a process of their own, so they do not share the server's interpreter lock
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(prompts, f)
        load = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                            "http_load.py"),
                               "--url", f"http://127.0.0.1:{port}", "--prompts", f.name, "--max-tokens", str(output),
                               "--concurrency", str(concurrency), "--count", "logprobs" if logprobs else "chars"],
                              capture_output=True, text=True, timeout=1800)
    finally:
        os.unlink(f.name)
        web.should_exit = True
        thread.join(10)
    if load.returncode != 0:
        raise RuntimeError(f"benchmarks/http_load.py failed ({load.returncode}): {load.stderr[-2000:]}")
    return json.loads(load.stdout.strip().splitlines()[-1])


def section_ours(size: dict, config: M1Config, policy: RunPolicy, params, http: bool, decode_steps: list[int],
                 prefill_batch: int) -> None:
    model = M1ForCausalLM(config, policy=policy)
    # Rows share one cache write index: a request joins a running batch only if the cache also holds the age of the
    # oldest live row, so prompt + 2 x output keeps every slot busy (prompt + output alone admits one row at a time:
    # the first H200 run, 2026-11-30, measured exactly that: 357 tok/s at every concurrency).
    context = -(-(size["prompt"] + 2 * size["output"]) // 64) * 64
    for k in decode_steps:
        batcher = Batcher(model, params, one_char, max_batch=max(size["concurrency"]), max_context=context,
                          chunk_size=size["chunk"], max_queue=4096, decode_steps=k, prefill_batch=prefill_batch)
        begin = time.perf_counter()
        batcher.warm_up(size["prompt"])  # every prefill group size, both decode variants
        record(section="engine", what="compile", decode_steps=k, prefill_batch=batcher.prefill_batch,
               context=context, seconds=time.perf_counter() - begin)
        timeline = Timeline(batcher) if TIMELINE["path"] else None
        batcher.start_thread()
        try:
            for c in size["concurrency"]:
                prompts = prompts_for(config, max(2 * c, 8), size["prompt"], seed=c)
                record(section="engine", what="serve", concurrency=c, decode_steps=k,
                       prefill_batch=batcher.prefill_batch,
                       **run_engine(batcher, prompts, size["output"], c, timeline))
                if timeline is not None:
                    summary = timeline.write(TIMELINE["path"], wave=c, decode_steps=k, concurrency=c)
                    if c == max(size["concurrency"]):
                        title = f"K={k}, {c} clients, {len(prompts)} requests (prefill batch {batcher.prefill_batch})"
                        TIMELINE["printed"].append(summary_table(summary, title))
            if timeline is not None:
                timeline.detach()
            if http and k == decode_steps[-1]:
                section_http(size, config, batcher)
        finally:
            batcher.stop(timeout=60)


def section_http(size: dict, config: M1Config, batcher: Batcher) -> None:
    """The running batcher behind HTTP, when fastapi, uvicorn and httpx are importable."""
    try:
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        record(section="http", what="skipped", reason=f"{type(err).__name__}: {err}")
        return
    for logprobs in (False, True):
        for c in size["concurrency"]:
            prompts = prompts_for(config, max(2 * c, 8), size["prompt"], seed=c)
            record(section="http+logprobs" if logprobs else "http", what="serve", concurrency=c,
                   decode_steps=batcher.decode_steps, **run_http(batcher, prompts, size["output"], c, logprobs))


def section_static(size: dict, config: M1Config, policy: RunPolicy, params) -> None:
    model = M1ForCausalLM(config, policy=policy)
    batch = size["static_batch"]
    prompts = prompts_for(config, batch, size["prompt"], seed=7)
    generate(model, params, prompts, max_new_tokens=size["output"])  # compiles
    samples = []
    for _ in range(2):
        out = generate(model, params, prompts, max_new_tokens=size["output"])
        samples.append(out.usage)
    usage = min(samples, key=lambda u: u.decode_seconds)
    total = usage.prefill_seconds + usage.decode_seconds
    record(section="static", what="generate", batch=batch, decode_tokens_per_s=usage.decode_tokens_per_second,
           output_tokens_per_s=usage.completion_tokens / total, prefill_seconds=usage.prefill_seconds,
           decode_seconds=usage.decode_seconds)


def section_transformers(size: dict, config: M1Config) -> None:
    try:
        import torch
        from transformers import MiniMaxConfig, MiniMaxForCausalLM
    except ImportError as err:
        record(section="transformers", what="skipped", reason=f"{type(err).__name__}: {err}")
        return
    import transformers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    raw = {k: v for k, v in config.to_hf().items() if k not in ("m1jax", "dtype")}
    model = MiniMaxForCausalLM(MiniMaxConfig(**raw)).to(device=device, dtype=torch.bfloat16).eval()
    batch, output = size["static_batch"], size["output"]
    prompt = torch.tensor(prompts_for(config, batch, size["prompt"], seed=7), device=device)
    kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, eos_token_id=None, pad_token_id=0,
                  max_new_tokens=output, min_new_tokens=output)
    with torch.no_grad():
        model.generate(prompt, **kwargs)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        out = model.generate(prompt, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - begin
    new = int(out.shape[1] - prompt.shape[1]) * batch
    record(section="transformers", what="static generate", version=transformers.__version__, batch=batch,
           output_tokens_per_s=new / seconds, seconds=seconds)
    try:  # continuous batching: does it take a lightning/softmax hybrid?
        with torch.no_grad():
            model.generate_batch(inputs=prompt[:2].tolist(), generation_config=model.generation_config)
        record(section="transformers", what="generate_batch", result="ran")
    except Exception as err:
        record(section="transformers", what="generate_batch", result=f"{type(err).__name__}: {str(err)[:200]}")


def table() -> str:
    rows = ["| what | concurrency | requests | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms "
            "| TPOT p50 / p99 ms |", "|---|---|---|---|---|---|---|"]
    static = next((r for r in RESULTS if r["section"] == "static" and r.get("what") == "generate"), None)
    for r in RESULTS:
        if r.get("what") == "serve":
            ttft, itl, tpot = r["ttft_ms"], r["itl_ms"], r.get("tpot_ms", {"p50": None, "p99": None})
            rows.append(f"| {r['section']} K={r.get('decode_steps')} | {r['concurrency']} | {r['requests']} | "
                        f"{r['output_tokens_per_s']:.0f} | {ttft['p50']} / {ttft['p99']} | "
                        f"{itl['p50']} / {itl['p99']} | {tpot['p50']} / {tpot['p99']} |")
    if static:
        rows.append(f"| m1jax.generate static batch {static['batch']} | - | {static['batch']} | "
                    f"{static['output_tokens_per_s']:.0f} (decode only {static['decode_tokens_per_s']:.0f}) | | | |")
    for r in RESULTS:
        if r["section"] == "transformers" and r.get("what") == "static generate":
            rows.append(f"| transformers {r['version']} static generate | - | {r['batch']} | "
                        f"{r['output_tokens_per_s']:.0f} | | | |")
        if r["section"] == "transformers" and r.get("what") == "generate_batch":
            rows.append(f"| transformers generate_batch | | | {r['result']} | | | |")
        if r.get("what") in ("failed", "skipped"):
            rows.append(f"| {r['section']} {r['what']} | | | {str(r.get('error', r.get('reason')))[:120]} | | | |")
    engine = [r for r in RESULTS if r.get("what") == "serve" and r["section"] == "engine"]
    top = max((r["concurrency"] for r in engine), default=None)
    if static and top:
        rows.append("")
        for r in engine:
            if r["concurrency"] == top:
                rows.append(f"engine K={r['decode_steps']} at {top} clients / static decode: "
                            f"{r['output_tokens_per_s'] / static['decode_tokens_per_s']:.1%} (target >= 80%)")
    return "\n".join(rows)


def plot(out_dir: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for section in ("engine", "http", "http+logprobs"):
        for k in sorted({r.get("decode_steps") for r in RESULTS if r["section"] == section}, key=str):
            rows = [r for r in RESULTS if r["section"] == section and r.get("what") == "serve"
                    and r.get("decode_steps") == k]
            if rows:
                ax.plot([r["output_tokens_per_s"] for r in rows], [r["tpot_ms"]["p50"] for r in rows], "o-",
                        label=f"{section} K={k}")
                for r in rows:
                    ax.annotate(str(r["concurrency"]), (r["output_tokens_per_s"], r["tpot_ms"]["p50"]))
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel("time per output token p50 (ms)")
    ax.set_title("m1jax serve: latency vs throughput (labels: clients)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "serve_latency_throughput.png"), dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the CPU, seconds)")
    parser.add_argument("--http", action="store_true", help="also through HTTP (needs fastapi, uvicorn, httpx)")
    parser.add_argument("--sections", default="ours,static,transformers")
    parser.add_argument("--decode-steps", default="8,16", help="decode steps per device call, one engine run each")
    parser.add_argument("--prefill-batch", type=int, default=None, help="requests prefilled together")
    parser.add_argument("--no-routing", action="store_true",
                        help="engine requests without per-request routing logs (as /v1/completions sends them)")
    parser.add_argument("--timeline", action="store_true",
                        help="record the engine's scheduler turns: $OUT/timeline.jsonl and a summary printed last")
    args = parser.parse_args(argv)
    ROUTING["want_routing"] = not args.no_routing
    os.makedirs(args.out, exist_ok=True)
    LOG.path = os.path.join(args.out, "serve.jsonl")
    TIMELINE["path"], TIMELINE["printed"] = None, []
    if args.timeline:
        TIMELINE["path"] = os.path.join(args.out, "timeline.jsonl")
        open(TIMELINE["path"], "w").close()
    size = SIZES["smoke" if args.smoke else "full"]
    decode_steps = [int(k) for k in args.decode_steps.split(",")]
    prefill_batch = args.prefill_batch or size["prefill_batch"]
    config, policy = config_for(size["model"]), policy_for(size["model"])
    params = random_params(config, policy=policy)
    record(section="setup", what="device", device=str(jax.devices()[0].device_kind), jax=jax.__version__, **{
        k: v for k, v in size.items() if k not in ("concurrency", "prefill_batch")}, decode_steps=decode_steps,
        prefill_batch=prefill_batch, routing=not args.no_routing, param_dtype=policy.param_dtype,
        compute_dtype=policy.compute_dtype)
    sections = {"ours": lambda: section_ours(size, config, policy, params, args.http, decode_steps, prefill_batch),
                "static": lambda: section_static(size, config, policy, params),
                "transformers": lambda: section_transformers(size, config)}
    for name in args.sections.split(","):
        try:
            sections[name]()
        except Exception as err:  # a failing section is logged; the others still run
            record(section=name, what="failed", error=f"{type(err).__name__}: {err}", trace=traceback.format_exc())
    text = table()
    with open(os.path.join(args.out, "serve_table.md"), "w") as f:
        f.write(text + "\n")
    try:
        plot(args.out)
    except Exception as err:  # the table matters more than the figure
        say(f"plot failed: {type(err).__name__}: {err}")
    say(text)
    for summary in TIMELINE["printed"]:
        say("\n" + summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
