"""Helpers the GPU benchmark scripts share: a JSON-lines log written as the run goes, timing, relative error."""
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from m1jax import M1Config, abstract_params
from m1jax.config import RunPolicy, m1_schedule

# A two-layer model for the --smoke runs of the inference and serving benchmarks (CPU, seconds).
SMOKE_CONFIG = M1Config(vocab_size=96, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16, num_experts=2,
                        experts_per_token=1, expert_size=32, layer_types=m1_schedule(2, period=2), rotary_dim=8,
                        max_position_embeddings=4096)


def config_for(name: str) -> M1Config:
    """"smoke", or a preset (run it under `policy_for(name)`)."""
    if name == "smoke":
        return SMOKE_CONFIG
    return M1Config.from_preset(name)


def policy_for(name: str) -> RunPolicy:
    """The benchmarks' run policy: float32 for "smoke", bf16 weights and compute for a preset."""
    if name == "smoke":
        return RunPolicy()
    return RunPolicy(param_dtype="bfloat16", compute_dtype="bfloat16")


def random_params(config: M1Config, seed: int = 0, policy: RunPolicy = RunPolicy()):
    """N(0, 0.02) matrices, unit norm scales (in policy.param_dtype), drawn on the device in one jitted call."""
    leaves, treedef = jax.tree.flatten_with_path(abstract_params(config, policy))

    @jax.jit
    def draw(key):
        return [jnp.ones(leaf.shape, leaf.dtype) if "scale" in jax.tree_util.keystr(path) else
                (0.02 * jax.random.normal(jax.random.fold_in(key, i), leaf.shape)).astype(leaf.dtype)
                for i, (path, leaf) in enumerate(leaves)]

    return jax.tree.unflatten(treedef, draw(jax.random.key(seed)))


def say(*parts):
    print(" ".join(str(p) for p in parts), flush=True)


class RunLog:
    """A benchmark run's rows: kept for its table (`rows`), printed, and appended to a JSON-lines file as they come
    (a run cut short still leaves its numbers). Call it as record(**row); set `path` before the first row."""

    def __init__(self, path: str):
        self.path = path
        self.rows: list[dict] = []

    def __call__(self, **row):
        self.rows.append(row)
        line = json.dumps(row)
        say(line)
        with open(self.path, "a") as f:
            f.write(line + "\n")


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


def parse_tiling(spec: str):
    """A grouped-matmul tiling from "BMxBNxBK/warps/stages[/split_k]" (a Triton Tiling, e.g. "128x256x64/8/3" or
    "16x64x128/4/4/2") or "mosaic:BMxBNxBK/stages" (a MosaicTiling for the Mosaic GPU kernels, e.g.
    "mosaic:128x128x64/4")."""
    from pallas_kernels.grouped_matmul import MosaicTiling, Tiling
    try:
        if spec.startswith("mosaic:"):
            blocks, stages = spec.removeprefix("mosaic:").split("/")
            block_m, block_n, block_k = (int(v) for v in blocks.split("x"))
            return MosaicTiling(block_m, block_n, block_k, int(stages))
        blocks, warps, stages, *split = spec.split("/")
        block_m, block_n, block_k = (int(v) for v in blocks.split("x"))
        if len(split) > 1:
            raise ValueError("too many fields")
        return Tiling(block_m, block_n, block_k, int(warps), int(stages), split_k=int(split[0]) if split else 1)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"tiling {spec!r} is not BMxBNxBK/warps/stages[/split_k] (e.g. 128x256x64/8/3) or "
                         f"mosaic:BMxBNxBK/stages (e.g. mosaic:128x128x64/4): {error}")


def tiling_spec(tiling) -> str:
    """parse_tiling's inverse: the string that names `tiling`."""
    if hasattr(tiling, "stages"):
        return f"mosaic:{tiling.block_m}x{tiling.block_n}x{tiling.block_k}/{tiling.stages}"
    split = f"/{tiling.split_k}" if tiling.split_k != 1 else ""
    return f"{tiling.block_m}x{tiling.block_n}x{tiling.block_k}/{tiling.num_warps}/{tiling.num_stages}{split}"


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
