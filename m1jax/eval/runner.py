"""The evaluation loop: items x K samples, generated in batches, scored, appended to OUT/samples.jsonl; resumable.

    result = run_eval(suite, model, params, tokenizer, out="runs/eval", samples=4, max_new_tokens=512,
                      temperature=1.0, top_p=0.95)

Each (item, sample k) is a unit keyed "<id>#<k>". A run first reads OUT/samples.jsonl and skips every key already
there, so a killed run continues where it stopped; OUT/run.json pins the settings that change what a sample
means (suite, data, generation settings, prompt format), and a rerun with other settings is refused rather than
mixed in. --samples and --limit may grow between runs (more keys). Pending units are sorted by prompt length and
generated `batch_size` rows at a time through m1jax.inference.generate (one compiled program per shape bucket).
OUT/results.json holds the suite's summary over the planned keys; OUT/results.md the same as a markdown table.
"""
from __future__ import annotations

import datetime
import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from m1jax.eval.data import SampleLog, sample_key
from m1jax.progress import progress_bar, status
from m1jax.tokenizer import decode_known

PINNED = ("suite", "data", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "prompt_format")


def check_settings(out: str, settings: dict[str, Any]) -> None:
    """Write OUT/run.json, or check that an earlier run in OUT used the same pinned settings."""
    path = os.path.join(out, "run.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
        changed = {k: (before.get(k), settings.get(k)) for k in PINNED if before.get(k) != settings.get(k)}
        if changed:
            detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"{out} holds samples of a run with other settings ({detail}); rerun with the same "
                             "settings to resume, or pass another --out")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=1)


def bucket_width(longest: int, multiple: int = 0) -> int:
    """The prompt width a batch is padded to: a multiple of `multiple` when given, else of a quarter of the largest
    power of two <= longest (at least 64), so widths fall in a few buckets (<= 25% padding) per octave."""
    step = multiple or max(64, 2 ** (longest.bit_length() - 3))
    return -(-longest // step) * step


def generate_texts(model, params, tokenizer, prompts: Sequence[list[int]], *, max_new_tokens: int,
                   temperature: float, top_p: float | None, top_k: int | None, seed: int, chunk_size: int,
                   batch_size: int | None = None, pad_multiple: int = 0) -> list[tuple[str, int]]:
    """(completion text, completion tokens) per prompt; the text stops before the eos id.

    Shapes are kept to a few buckets so that a whole evaluation compiles a handful of programs: the batch is
    filled to batch_size + 1 rows with filler rows whose prompt is bucket_width(longest) pad ids (their
    completions are thrown away). Rows do not interact (dropless MoE, per-row masks), so the real rows' tokens
    are those of a batch without the filler.
    """
    from m1jax.inference import generate
    eos = tokenizer.eos_id
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    rows = [list(p) for p in prompts]
    width = bucket_width(max(map(len, rows)), pad_multiple)
    width = max(min(width, model.config.max_position_embeddings - max_new_tokens), max(map(len, rows)))
    rows += [[pad] * width] * (max(batch_size or len(rows), len(rows)) + 1 - len(rows))
    out = generate(model, params, rows, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_p=top_p, top_k=top_k, seed=seed, eos_id=eos, chunk_size=chunk_size, pad_id=pad)
    texts = []
    for ids in out.completions[:len(prompts)]:
        texts.append((decode_known(tokenizer, [i for i in ids if i != eos]), len(ids)))
    return texts


def run_eval(suite, model, params, tokenizer, *, out: str, samples: int = 1, max_new_tokens: int | None = None,
             temperature: float = 1.0, top_p: float | None = 0.95, top_k: int | None = None, seed: int = 0,
             batch_size: int = 8, chunk_size: int = 4096, pad_multiple: int = 0, formatter: Callable | None = None,
             settings: dict[str, Any] | None = None, workers: int = 1, quiet: bool = False) -> dict[str, Any]:
    """Generate, score and summarize; returns the results dict also written to OUT/results.json.

    workers: threads that score a batch together, for suites whose scoring is thread-safe (code: sandboxed
    subprocesses)."""
    from m1jax.eval.prompts import plain_prompt
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples={samples!r}: pass an integer >= 1 (--samples)")
    if temperature == 0 and samples > 1:
        raise ValueError(f"--samples {samples} with greedy decoding (--temperature 0) draws {samples} identical "
                         "samples; pass --temperature > 0 or --samples 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: pass an integer >= 1 (--batch-size)")
    max_new_tokens = max_new_tokens or suite.default_max_new_tokens
    formatter = formatter or plain_prompt
    prompt_format = getattr(formatter, "kind", "plain") if suite.use_chat else "completion"
    os.makedirs(out, exist_ok=True)
    settings = {"suite": suite.name, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                "top_k": top_k, "seed": seed, "prompt_format": prompt_format, "samples": samples,
                **(settings or {})}
    check_settings(out, settings)
    log = SampleLog(os.path.join(out, "samples.jsonl"))

    items = suite.items()
    planned = [(item, k) for item in items for k in range(samples)]
    pending = [(item, k) for item, k in planned if sample_key(item["id"], k) not in log.done]
    if len(pending) < len(planned):
        status(f"eval {suite.name}: resuming, {len(planned) - len(pending)} of {len(planned)} samples already in "
               f"{log.path}", quiet=quiet)
    encoded: dict[str, list[int]] = {}
    for item, _ in pending:
        if item["id"] not in encoded:
            text = formatter(item["messages"]) if suite.use_chat else item["text"]
            encoded[item["id"]] = tokenizer.encode(text)
    pending.sort(key=lambda unit: len(encoded[unit[0]["id"]]))
    limit = model.config.max_position_embeddings if pending else 0
    too_long = [i for i, ids in encoded.items() if len(ids) + max_new_tokens > limit]
    if too_long:
        raise ValueError(f"{len(too_long)} prompt(s) (first: {too_long[0]!r}, {len(encoded[too_long[0]])} tokens) + "
                         f"max_new_tokens={max_new_tokens} exceed the model's max_position_embeddings={limit}; "
                         "nothing is truncated: lower --max-new-tokens or leave those records out")

    with progress_bar(total=len(planned), initial=len(planned) - len(pending), desc=f"eval {suite.name}",
                      unit="sample", quiet=quiet, plain_every=max(batch_size, 1)) as bar:
        for start in range(0, len(pending), batch_size):
            batch = pending[start:start + batch_size]
            first = sample_key(batch[0][0]["id"], batch[0][1])
            texts = generate_texts(model, params, tokenizer, [encoded[item["id"]] for item, _ in batch],
                                   max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   top_k=top_k, seed=(seed * 1_000_003 + zlib.crc32(first.encode())) % 2**31,
                                   chunk_size=chunk_size, batch_size=batch_size, pad_multiple=pad_multiple)
            scores = []
            if workers > 1 and getattr(suite, "thread_safe_scoring", False):
                with ThreadPoolExecutor(workers) as pool:
                    all_scored = list(pool.map(suite.score, [item for item, _ in batch], [t for t, _ in texts]))
            else:  # math-verify times itself out with signals: main thread only
                all_scored = [suite.score(item, text) for (item, _), (text, _) in zip(batch, texts)]
            for (item, k), (completion, n_tokens), scored in zip(batch, texts, all_scored):
                log.append({"key": sample_key(item["id"], k), "id": item["id"], "sample": k,
                            "prompt_tokens": len(encoded[item["id"]]), "completion_tokens": n_tokens,
                            "completion": completion, **scored})
                scores.append(scored["score"])
            bar.update(len(batch), score=f"{sum(scores) / len(scores):.3f}")

    records = [log.done[sample_key(item["id"], k)] for item, k in planned]
    summary = suite.summarize(records, samples)
    result = {"suite": suite.name, "settings": settings, "summary": summary, "samples_scored": len(records),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(results_markdown(suite, result))
    return result


def results_markdown(suite, result: dict[str, Any]) -> str:
    s = result["settings"]
    where = f" on `{s['checkpoint']}`" if s.get("checkpoint") else ""
    sampling = "greedy" if s["temperature"] == 0 else f"temperature {s['temperature']}, top-p {s['top_p']}"
    return (f"# m1jax eval: {suite.name}{where}\n\n"
            f"{result['date']}; {sampling}; up to {s['max_new_tokens']} new tokens; prompts: {s['prompt_format']}"
            + (f"; data `{s['data']}`" if s.get("data") else "") + "\n\n" + suite.table(result["summary"]))
