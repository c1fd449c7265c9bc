"""Streaming load on an OpenAI-compatible /v1/completions server, from a process of its own.

    python3 benchmarks/http_load.py --url http://127.0.0.1:8000 --prompts prompts.json --max-tokens 256 \
        --concurrency 64

prompts.json holds a list of prompts (token-id lists or strings). `concurrency` clients (asyncio, httpx) each send
their share of the prompts one after another, streamed, greedy, and count each chunk's tokens: by default from its
log-probabilities (the request asks `logprobs: 0`, so each chunk lists its tokens); with `--count chars`, without
log-probabilities, one token per character of the chunk's text, for a server whose detokenizer maps every token
to one character (`benchmarks/serve.py`'s does: its HTTP runs then decode as its in-process runs do, with no
log-probabilities computed on the device). Every token is stamped when its chunk arrives. Prints one JSON line:
requests, output_tokens, seconds, output_tokens_per_s, and p50/p99 in ms of the time to first token, the
inter-token latency and the time per output token ((last - first) / (tokens - 1) per request).

Why a process of its own: `benchmarks/serve.py --http` used to run these clients in the server's process, where
parsing 64 streams competed with the server and the batcher for one interpreter lock, so the figure measured both
sides at once. Needs httpx and numpy only (no jax).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

import numpy as np


def percentiles(values: list[float]) -> dict:
    """Seconds -> {"p50", "p99"} in ms (None for no values)."""
    if not values:
        return {"p50": None, "p99": None}
    array = np.asarray(values) * 1e3
    return {"p50": round(float(np.percentile(array, 50)), 3), "p99": round(float(np.percentile(array, 99)), 3)}


def run_load(url: str, prompts: list, max_tokens: int, concurrency: int, count: str = "logprobs") -> dict:
    import httpx
    body = {"max_tokens": max_tokens, "temperature": 0, "stream": True, **({"logprobs": 0} if count == "logprobs"
                                                                          else {})}

    def tokens_in(choice: dict) -> int:
        if count == "chars":
            return len(choice["text"])
        return 0 if choice["logprobs"] is None else len(choice["logprobs"]["tokens"])

    ttft, itl, tpot, tokens = [], [], [], [0]

    async def client(http, mine):
        for prompt in mine:
            begin, stamps = time.perf_counter(), []
            async with http.stream("POST", "/v1/completions", json={"prompt": prompt, **body}) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"{url}/v1/completions answered {response.status_code}: "
                                       f"{(await response.aread())[:300]!r}")
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and '"finish_reason": null' in line:
                        now, choice = time.perf_counter(), json.loads(line[6:])["choices"][0]
                        stamps.extend([now] * tokens_in(choice))
            if not stamps:
                raise RuntimeError(f"{url}/v1/completions streamed no tokens for a prompt")
            ttft.append(stamps[0] - begin)
            itl.extend(np.diff(stamps).tolist())
            if len(stamps) > 1:
                tpot.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
            tokens[0] += len(stamps)

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=600,
                                     limits=httpx.Limits(max_connections=concurrency + 4)) as http:
            await asyncio.gather(*[client(http, prompts[i::concurrency]) for i in range(concurrency)])

    begin = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - begin
    return {"requests": len(prompts), "output_tokens": tokens[0], "seconds": wall,
            "output_tokens_per_s": tokens[0] / wall, "ttft_ms": percentiles(ttft), "itl_ms": percentiles(itl),
            "tpot_ms": percentiles(tpot)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--prompts", required=True, help="a JSON file: a list of prompts (id lists or strings)")
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--count", choices=("logprobs", "chars"), default="logprobs",
                        help="how a chunk's tokens are counted (module docstring)")
    args = parser.parse_args(argv)
    with open(args.prompts) as f:
        prompts = json.load(f)
    if not isinstance(prompts, list) or not prompts:
        raise SystemExit(f"--prompts {args.prompts}: expected a non-empty JSON list of prompts")
    if args.concurrency < 1 or args.max_tokens < 1:
        raise SystemExit("--concurrency and --max-tokens take positive integers")
    result = run_load(args.url.rstrip("/"), prompts, args.max_tokens, args.concurrency, args.count)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
