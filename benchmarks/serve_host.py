"""The serving engine's host hand-off of one decode call: K tokens for each of B requests become text and events.

    PYTHONPATH=. python3 benchmarks/serve_host.py [--batch 64] [--steps 32] [--reps 20] [--tokenizer-dir DIR]

No device: this is the scheduler thread's Python work between a decode call's tokens arriving and their requests
seeing them (`TokenOutput._accept_tokens`), which is on the critical path when a wave of requests ends (the last
call's tokens are handed over before the clients see their ends and the next wave is admitted). It times, in one
process and on the same tokens, the slow twin that takes a call's tokens one at a time (`_accept_each`: two
detokenizations and one event per token) and the run path (`_accept_tokens`: one detokenization and one event per
request per call), for each tokenizer (none: text "" as benchmarks/serve.py runs it; byte; the checkpoint's BPE when
--tokenizer-dir has a tokenizer.json) and each event sink (a list append, as benchmarks/serve.py's clients; an
asyncio loop on another thread, as the HTTP server's `_Run` sink), without and with a stop string (chat requests
always carry one). Prints ms per call (median over --reps calls of fresh requests, each taking --steps tokens per
call until its length of 8 calls) and the ratio; writes $OUT/serve_host.jsonl.
"""
import argparse
import asyncio
import json
import os
import statistics
import threading
import time

import numpy as np

from m1jax.serve.job import Job, TokenOutput
from m1jax.tokenizer import ByteTokenizer, load_tokenizer


class Output(TokenOutput):
    metrics = None

    def __init__(self, decode_text):
        self.decode_text = decode_text


def asyncio_sink():
    """An event sink like the server's: each event crosses to an asyncio loop running on another thread."""
    loop = asyncio.new_event_loop()
    queue: asyncio.Queue = asyncio.Queue()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def put(kind, data):
        loop.call_soon_threadsafe(queue.put_nowait, (kind, data))
    return put, lambda: loop.call_soon_threadsafe(loop.stop)


def time_call(output: Output, path: str, batch: int, steps: int, reps: int, ids: np.ndarray, sink, stops) -> float:
    """Median seconds per call of `batch` x `steps` tokens (8 calls per set of requests)."""
    times = []
    calls = 8
    for rep in range(max(1, reps // calls)):
        jobs = [Job([1], steps * calls, stop_strings=stops, on_event=sink) for _ in range(batch)]
        for call in range(calls):
            tokens = ids[rep % len(ids), :, call * steps:(call + 1) * steps].tolist()
            accept = getattr(output, path)
            t0 = time.perf_counter()
            for b, job in enumerate(jobs):
                accept(job, tokens[b], None)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32, help="decode steps per call (K)")
    parser.add_argument("--reps", type=int, default=40, help="calls timed per variant")
    parser.add_argument("--tokenizer-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                                "minimax-m1"))
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    tokenizers = {"none": (lambda ids: "", 256), "byte": (ByteTokenizer().decode, 256)}
    if os.path.exists(os.path.join(args.tokenizer_dir, "tokenizer.json")):
        bpe = load_tokenizer(args.tokenizer_dir)
        tokenizers["m1-bpe"] = (bpe.decode, min(bpe.vocab_size, 200_000))
    else:
        print(f"no tokenizer.json in {args.tokenizer_dir}: the BPE rows are skipped", flush=True)
    put, stop_loop = asyncio_sink()
    sinks = {"list": lambda: (lambda kind, data, box=[]: box.append(time.perf_counter())), "asyncio": lambda: put}
    rows = []
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "serve_host.jsonl"), "w") as log:
        for name, (decode, vocab) in tokenizers.items():
            # 32 ASCII-ish ids for the byte tokenizer (text that decodes); any ids for the others
            high = 127 if name == "byte" else vocab
            ids = rng.integers(32, high, (4, args.batch, args.steps * 8))
            output = Output(decode)
            for sink_name, sink in sinks.items():
                for stops in ((), ("<end_of_sentence>",)):
                    ms = {path: 1e3 * time_call(output, path, args.batch, args.steps, args.reps, ids, sink(), stops)
                          for path in ("_accept_each", "_accept_tokens")}
                    row = {"tokenizer": name, "sink": sink_name, "stop_string": bool(stops), "batch": args.batch,
                           "steps": args.steps, "per_token_ms": ms["_accept_each"], "per_run_ms": ms["_accept_tokens"]}
                    rows.append(row)
                    log.write(json.dumps(row) + "\n")
                    print(f"{name:7s} {sink_name:8s} stop {bool(stops)!s:5s}: one token at a time "
                          f"{ms['_accept_each']:7.2f} ms, a run at a time {ms['_accept_tokens']:6.2f} ms", flush=True)
    stop_loop()
    print(f"\nHost hand-off of one decode call ({args.batch} requests x {args.steps} tokens), ms (median)\n")
    print("| tokenizer | event sink | stop string | one token at a time (before) | a run at a time | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokenizer']} | {r['sink']} | {'yes' if r['stop_string'] else 'no'} | {r['per_token_ms']:.2f} | "
              f"{r['per_run_ms']:.2f} | {r['per_token_ms'] / r['per_run_ms']:.1f}x |")


if __name__ == "__main__":
    main()
