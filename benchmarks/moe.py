"""The whole MoE layer (router, dispatch, SwiGLU experts, combine) forward + backward, on one GPU and expert-parallel.

    PYTHONPATH=. python3 benchmarks/moe.py            # on the GPU machine (one call; uses every GPU present)
    PYTHONPATH=. python3 benchmarks/moe.py --smoke    # tiny shapes on the CPU with 2 fake devices, any machine

1. Correctness on the device: the layer (Pallas grouped matmul through impl="auto") against the dense all-experts
   twin in float32 and bfloat16; with several devices, the sharded layer (expert=n, data=n, and capacity mode)
   against the same layer on one device, forward and gradients.
2. Timing at research width: hidden 2048, expert width 1408, 32 experts, top-2, 16384 tokens (8 x 2048), bfloat16,
   forward + backward (gradients of the input and every parameter) of the MoE module. Variants on one GPU: Pallas
   grouped matmul (the default), XLA ragged_dot (both GPU lowerings), capacity factor 1.25; peers in the same run:
   the balanced dense einsum (E, N k / E, hidden) with no routing (the compute floor) and a bf16 8192^3 matmul (the
   card's rate). With n >= 2 GPUs: the layer on a mesh expert=n and data=n, same global batch.
FLOPs counted: 3 expert matmuls of 2 N k hidden F each forward, twice that backward (router excluded).
Writes JSON lines to $OUT/moe.jsonl (or ./moe.jsonl) as it goes; prints a table last.
"""
import argparse
import os
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE and "XLA_FLAGS" not in os.environ:  # two fake CPU devices so the sharded path runs too
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import json_logger, rel_err, timed  # noqa: E402
from m1jax.config import M1Config, RunPolicy  # noqa: E402
from m1jax.layers.moe import MoE, moe_dense_reference  # noqa: E402
from m1jax.layers.moe_core import expert_capacity  # noqa: E402
from m1jax.layers.partitioning import logical_axes  # noqa: E402
from m1jax.sharding import activation_sharding, create_mesh, shard_params  # noqa: E402

RESEARCH = dict(hidden=2048, width=1408, experts=32, k=2, batch=8, length=2048)
SMOKE_SIZES = dict(hidden=64, width=48, experts=4, k=2, batch=4, length=33)
LOG_PATH = os.path.join(os.environ.get("OUT", "."), "moe.jsonl")
FAILURES = []


log = json_logger(LOG_PATH)


def layer_config(sizes, dtype="bfloat16", **options):
    """(the layer's M1Config, its RunPolicy: dtype weights and compute, plus options such as capacity_factor)."""
    return (M1Config.from_preset("tiny", hidden_size=sizes["hidden"], expert_size=sizes["width"],
                                 num_experts=sizes["experts"], experts_per_token=sizes["k"]),
            RunPolicy(param_dtype=dtype, compute_dtype=dtype, **options))


def problem(cfg, policy, batch, length, seed=0):
    """Parameters (router scaled so that loads are uneven, as in a trained model), tokens and an output cotangent."""
    keys = jax.random.split(jax.random.key(seed), 3)
    dtype = jnp.dtype(policy.compute_dtype)
    x = jax.random.normal(keys[0], (batch, length, cfg.hidden_size), jnp.float32).astype(dtype)
    params = jax.jit(MoE(cfg, policy=policy).init)(keys[1], x)
    params["params"]["gate"] = params["params"]["gate"] * 3.0
    d_out = jax.random.normal(keys[2], x.shape, jnp.float32).astype(dtype)
    return params, x, d_out


def forward_backward(cfg, policy, grouped_matmul=None, mesh=None):
    """jit(params, x, d_out) -> (out, stats, d_params, d_x): the layer's forward and its full VJP (on `mesh`)."""
    def run(params, x, d_out):
        (out, stats), vjp = jax.vjp(lambda p, y: MoE(cfg, grouped_matmul, mesh, policy).apply(p, y), params, x)
        d_params, d_x = vjp((d_out, jax.tree.map(jnp.zeros_like, stats)))
        return out, stats, d_params, d_x
    return jax.jit(run)


def layer_names(cfg, policy, x):
    """The logical axis names of one MoE layer's variables (experts split over the "expert" mesh axis)."""
    return {"params": logical_axes(MoE(cfg, policy=policy), x)}


def on_mesh(cfg, policy, mesh, params, x, d_out):
    fn = forward_backward(cfg, policy, mesh=mesh)
    with jax.set_mesh(mesh):
        tokens = activation_sharding(mesh, ("batch", None, None))
        placed = shard_params(params, mesh, layer_names(cfg, policy, x))
        return fn(placed, jax.device_put(x, tokens), jax.device_put(d_out, tokens))


def check_correctness(sizes):
    """Small uneven problem: layer vs dense twin on one device; sharded vs one device on every mesh that fits."""
    n = len(jax.devices())
    for dtype, tol in (("float32", 1e-4), ("bfloat16", 3e-2)):
        cfg, policy = layer_config(sizes, dtype)
        params, x, _ = problem(cfg, policy, sizes["batch"], sizes["length"], seed=1)
        out, _ = jax.jit(MoE(cfg, policy=policy).apply)(params, x)
        p = jax.tree.map(lambda a: a.astype(jnp.float32), params["params"])
        want = moe_dense_reference(x.reshape(-1, cfg.hidden_size).astype(jnp.float32), p["gate"], p["w1"], p["w3"],
                                   p["w2"], cfg.experts_per_token)
        err = rel_err(out.reshape(want.shape), want)
        log(event="check", what="layer vs dense twin", dtype=dtype, rel_err=err)
        if not err <= tol:
            FAILURES.append(f"layer vs dense twin ({dtype}): rel_err {err:.2e}")
    if n < 2:
        return
    for options in ({}, {"capacity_factor": 1.0}):
        cfg, policy = layer_config(sizes, "float32", **options)
        params, x, d_out = problem(cfg, policy, sizes["batch"] * n, sizes["length"], seed=2)
        fn = forward_backward(cfg, policy)
        want = fn(params, x, d_out)
        for axes in ({"expert": n}, {"data": n}):
            if cfg.num_experts % axes.get("expert", 1):
                continue
            got = on_mesh(cfg, policy, create_mesh(axes), params, x, d_out)
            errs = [rel_err(g, w) for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
            label = f"sharded {axes} vs one device {options}"
            log(event="check", what=label, max_rel_err=max(errs), dropped=float(got[1]["dropped_fraction"]))
            if not max(errs) <= 1e-4:
                FAILURES.append(f"{label}: max rel_err {max(errs):.2e} over outputs and gradients")


def time_variants(sizes, smoke, table):
    reps, inner = (2, 1) if smoke else (20, 5)
    tokens = sizes["batch"] * sizes["length"]
    flops = 3 * (3 * 2.0 * tokens * sizes["k"] * sizes["hidden"] * sizes["width"])  # forward + 2x backward
    cfg, policy = layer_config(sizes)
    params, x, d_out = problem(cfg, policy, sizes["batch"], sizes["length"])
    stats = jax.jit(MoE(cfg, policy=policy).apply)(params, x)[1]
    counts = np.asarray(stats["tokens_per_expert"])
    log(event="routing", max_over_mean_load=float(counts.max() / counts.mean()), empty_experts=int((counts == 0).sum()))

    def add(variant, devices, run, note=""):
        try:
            seconds = timed(run, reps=reps, inner=inner, slow_seconds=0.05)
        except Exception as error:  # one failing variant does not stop the others
            log(event="time", variant=variant, devices=devices, error=repr(error)[:400])
            table.append((variant, devices, None, note + " FAILED"))
            return
        log(event="time", variant=variant, devices=devices, ms=seconds * 1e3, tflops=flops / seconds / 1e12)
        table.append((variant, devices, seconds, note))

    matmul_n = 512 if smoke else 8192
    a = jax.random.normal(jax.random.key(3), (matmul_n, matmul_n), jnp.bfloat16)
    mm = jax.jit(lambda a: a @ a)
    seconds = timed(mm, a, reps=reps, inner=inner)
    peak = 2.0 * matmul_n ** 3 / seconds
    log(event="peer", variant=f"bf16 matmul {matmul_n}^3", tflops=peak / 1e12)

    fn = forward_backward(cfg, policy)
    add("layer, grouped_matmul auto (Pallas on GPU)", 1, lambda: fn(params, x, d_out))
    ragged = forward_backward(cfg, policy, jax.lax.ragged_dot)
    add("layer, ragged_dot", 1, lambda: ragged(params, x, d_out))
    if jax.default_backend() == "gpu":  # the flag is read when tracing: a fresh jit, timed while it is set
        jax.config.update("jax_ragged_dot_use_gpu_pallas_triton_lowering", True)
        try:
            triton = forward_backward(cfg, policy, jax.lax.ragged_dot)
            add("layer, ragged_dot (pallas triton lowering)", 1, lambda: triton(params, x, d_out))
        finally:
            jax.config.update("jax_ragged_dot_use_gpu_pallas_triton_lowering", False)
    _, capped_policy = layer_config(sizes, capacity_factor=1.25)
    capped = forward_backward(cfg, capped_policy)
    dropped = float(jax.jit(MoE(cfg, policy=capped_policy).apply)(params, x)[1]["dropped_fraction"])
    add("layer, capacity 1.25", 1, lambda: capped(params, x, d_out), f"drops {dropped:.1%}")

    rows = tokens * sizes["k"] // sizes["experts"]
    grouped = x.reshape(-1, sizes["hidden"])[:rows * sizes["experts"] // sizes["k"]]
    grouped = jnp.concatenate([grouped] * sizes["k"]).reshape(sizes["experts"], rows, sizes["hidden"])
    w = params["params"]

    def balanced(xg, w1, w3, w2, dy):
        def ffn(xg, w1, w3, w2):
            h = jax.nn.silu(jnp.einsum("erd,edf->erf", xg, w1)) * jnp.einsum("erd,edf->erf", xg, w3)
            return jnp.einsum("erf,efd->erd", h, w2)
        out, vjp = jax.vjp(ffn, xg, w1, w3, w2)
        return out, vjp(dy)
    dense = jax.jit(balanced)
    dy = jnp.ones_like(grouped)
    add("peer: balanced dense einsum, no routing", 1, lambda: dense(grouped, w["w1"], w["w3"], w["w2"], dy))

    n = len(jax.devices())
    if n >= 2 and sizes["batch"] % n == 0:
        for axes in ({"expert": n}, {"data": n}, {"expert": n, "capacity": 1.25}):
            variant_policy = capped_policy if "capacity" in axes else policy
            mesh_axes = {k: v for k, v in axes.items() if k != "capacity"}
            if cfg.num_experts % mesh_axes.get("expert", 1):
                continue
            mesh = create_mesh(mesh_axes)
            sharded_fn = forward_backward(cfg, variant_policy, mesh=mesh)
            with jax.set_mesh(mesh):
                tokens_sharding = activation_sharding(mesh, ("batch", None, None))
                args = (shard_params(params, mesh, layer_names(cfg, policy, x)), jax.device_put(x, tokens_sharding),
                        jax.device_put(d_out, tokens_sharding))
                add(f"layer on mesh {axes}", n, lambda: sharded_fn(*args))
    return flops, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any machine (2 fake CPU devices)")
    args = parser.parse_args()
    sizes = SMOKE_SIZES if args.smoke else RESEARCH
    log(event="start", backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
        device_kind=jax.devices()[0].device_kind, jax=jax.__version__, sizes=sizes,
        capacity_1_25=expert_capacity(sizes["batch"] * sizes["length"], sizes["k"], sizes["experts"], 1.25),
        date=time.strftime("%Y-%m-%d"))
    with jax.default_matmul_precision("highest"):  # float32 checks without TF32
        check_correctness(SMOKE_SIZES if args.smoke else dict(hidden=256, width=192, experts=8, k=2, batch=4,
                                                              length=77))
    table = []
    flops, peak = time_variants(sizes, args.smoke, table)
    base = next((s for v, d, s, _ in table if v == "layer, grouped_matmul auto (Pallas on GPU)" and s), None)
    print(f"\nMoE layer forward+backward, {sizes}, {jax.devices()[0].device_kind}, "
          f"bf16 matmul peak here {peak / 1e12:.0f} TFLOP/s")
    print(f"{'variant':48} {'GPUs':>4} {'ms':>9} {'TF/s':>6} {'%peak':>6} {'vs 1-GPU layer':>14}  note")
    for variant, devices, seconds, note in table:
        if seconds is None:
            print(f"{variant:48} {devices:>4} {'-':>9} {'-':>6} {'-':>6} {'-':>14}  {note}")
            continue
        rate = flops / seconds
        speed = f"{base / seconds:.2f}x" if base else "-"
        print(f"{variant:48} {devices:>4} {seconds * 1e3:9.3f} {rate / 1e12:6.1f} {100 * rate / peak:5.1f}% "
              f"{speed:>14}  {note}")
    for failure in FAILURES:
        print("FAILED", failure)
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
