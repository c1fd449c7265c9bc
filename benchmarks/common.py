"""Helpers the GPU benchmark scripts share: a JSON-lines log written as the run goes, timing, relative error."""
import json
import statistics
import time

import jax
import numpy as np


def json_logger(path: str):
    """log(**record): print one JSON line and append it to `path` (a run cut short still leaves its numbers)."""
    def log(**record):
        line = json.dumps(record)
        print(line, flush=True)
        with open(path, "a") as f:
            f.write(line + "\n")
    return log


def timed(fn, *args, reps: int, inner: int, slow_seconds: float | None = None) -> float:
    """Median seconds per call: warm up (compiles), then reps x (inner back-to-back calls, one sync).
    With slow_seconds, a call slower than that gets 3 x 1 instead."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    if slow_seconds is not None and time.perf_counter() - start > slow_seconds:
        reps, inner = 3, 1
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
