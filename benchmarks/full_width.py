"""One M1 layer group at full width (7 lightning + 1 softmax layers, hidden 6144, 64 heads x 128, 8 kv heads,
experts of width 9216, top-2, bf16) sharded over the GPUs: training step (forward + backward), prefill, decode.

    PYTHONPATH=. python3 benchmarks/full_width.py [--experts 32] [--mesh expert=8] [--seq-len 4096]
    PYTHONPATH=. python3 benchmarks/full_width.py --smoke      (reduced width on 8 fake CPU devices: correctness)

Reports: step time, tokens/s, per-device peak memory next to `m1jax plan` for the same mesh (weights, gradients
and activations: this step has no optimizer), and the share of the step the MoE's collectives take, estimated by
timing the same all-gather and reduce-scatter alone (per MoE layer: forward one of each, backward one of each).
With 2 GPUs, run with --experts 4 (2 experts per GPU: full-width experts, fewer of them) to prove the script before
an 8-GPU machine is available. Prints a table last; JSON lines to $OUT/full_width.jsonl.
"""
import argparse
import functools
import json
import os
import time

if "--smoke" in os.sys.argv:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from m1jax.config import M1Config, RunPolicy, deepnorm_alpha, m1_schedule
from m1jax.inference.cache import init_cache
from m1jax.model import M1ForCausalLM, param_logical_axes
from m1jax.plan import GIB, plan
from m1jax.sharding import batch_sharding, create_mesh, param_shardings


def layer_group_config(experts: int, smoke: bool) -> tuple[M1Config, RunPolicy]:
    """(one group of M1's layers at full width (smoke: narrow), its run policy: bf16 (smoke: float32, so the
    sharded-vs-one-device check is tight) with a bf16 lm_head)."""
    alpha = deepnorm_alpha(80)
    if smoke:
        dims = dict(hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64, expert_size=512, rotary_dim=32)
    else:
        dims = dict(hidden_size=6144, num_heads=64, num_kv_heads=8, head_dim=128, expert_size=9216, rotary_dim=64)
    dtype = "float32" if smoke else "bfloat16"
    return (M1Config(vocab_size=1024, num_experts=experts, experts_per_token=2, layer_types=m1_schedule(8),
                     lightning_alpha=alpha, softmax_alpha=alpha, mlp_alpha=alpha, **dims),
            RunPolicy(param_dtype=dtype, compute_dtype=dtype, float32_lm_head=False))


def timed(fn, *args, repeats=5):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def peak_gib() -> float:
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    return max(s.get("peak_bytes_in_use", 0) for s in stats) / GIB


def collective_seconds(mesh, tokens_per_device: int, hidden: int, dtype) -> float:
    """One all-gather + one reduce-scatter over "expert" of the MoE's token block, timed alone."""
    expert = mesh.shape["expert"]
    if expert == 1:
        return 0.0
    spec = P(("data", "fsdp", "expert"))

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=spec, out_specs=spec)
    def round_trip(x):
        gathered = jax.lax.all_gather(x, "expert", tiled=True)
        return jax.lax.psum_scatter(gathered, "expert", tiled=True)

    x = jax.device_put(jnp.ones((tokens_per_device * mesh.size, hidden), dtype), NamedSharding(mesh, spec))
    seconds, _ = timed(round_trip, x, repeats=10)
    return seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--mesh", default=None, help="e.g. expert=8 (default: expert=<all devices>)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=None, help="global (default: one sequence per device)")
    parser.add_argument("--context", type=int, default=8192, help="decode context length")
    args = parser.parse_args()
    if args.smoke:
        args.experts, args.seq_len, args.context = 8, 128, 256
    axes = dict(part.split("=") for part in args.mesh.split(",")) if args.mesh else {"expert": jax.device_count()}
    axes = {k: int(v) for k, v in axes.items()}
    mesh = create_mesh(axes)
    cfg, policy = layer_group_config(args.experts, args.smoke)
    batch = args.batch_size or mesh.size
    model = M1ForCausalLM(cfg, policy, mesh=mesh)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    shardings = param_shardings(abstract, mesh, param_logical_axes(abstract))
    params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"],
                     out_shardings=shardings)()
    rng = np.random.default_rng(0)
    ids = jax.device_put(rng.integers(0, cfg.vocab_size, (batch, args.seq_len)).astype(np.int32),
                         batch_sharding(mesh, batch))

    def loss(p, x):
        logits = model.apply({"params": p}, x).logits
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, x[..., None], -1)[..., 0])

    grad_step = jax.jit(jax.value_and_grad(loss), out_shardings=(None, shardings))
    prefill = jax.jit(lambda p, x: model.apply({"params": p}, x, last_logits_only=True).logits)
    rows = []
    with jax.set_mesh(mesh):
        step_s, (loss_value, grads) = timed(grad_step, params, ids)
        train_peak = peak_gib()
        prefill_s, _ = timed(prefill, params, ids)
        cache = init_cache(cfg, batch, args.context + 8, policy=policy)
        cache = jax.device_put(cache, jax.tree.map(lambda x: batch_sharding(mesh, batch, x.ndim)
                                                   if x.ndim and x.shape[0] == batch else
                                                   NamedSharding(mesh, P()), cache))
        context = jax.device_put(rng.integers(0, cfg.vocab_size, (batch, args.context)).astype(np.int32),
                                 batch_sharding(mesh, batch))
        fill = jax.jit(lambda p, x, c: model.apply({"params": p}, x, cache=c, last_logits_only=True).cache)
        cache = fill(params, context, cache)
        step_ids = jax.device_put(np.ones((batch, 1), np.int32), batch_sharding(mesh, batch))
        decode = jax.jit(lambda p, x, c: model.apply({"params": p}, x, cache=c).logits)
        decode_s, _ = timed(decode, params, step_ids, cache)
        comm = collective_seconds(mesh, args.seq_len * batch // mesh.size, cfg.hidden_size, jnp.bfloat16)
    if args.smoke:  # correctness: the sharded gradients equal one device's (outside the mesh)
        single = jax.device_put(jax.device_get(params), jax.devices()[0])
        _, want = jax.jit(jax.value_and_grad(loss))(single, jax.device_put(jax.device_get(ids), jax.devices()[0]))
        rel = max(float(np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b, np.float32))
                        / (np.linalg.norm(np.asarray(b, np.float32)) + 1e-30))
                  for a, b in zip(jax.tree.leaves(jax.device_get(grads)), jax.tree.leaves(jax.device_get(want))))
        print(f"smoke: sharded vs one-device gradients, largest relative difference {rel:.2e}")
        assert rel < 1e-3, rel
    planned = plan(cfg, axes, batch_size=batch, seq_len=args.seq_len, policy=policy, training=True)
    planned_gib = (planned["params"] + planned["grads"] + planned["activations (estimate)"]
                   + planned["logits + grad (float32)"]) / GIB
    moe_layers = cfg.num_layers
    row = {"card": jax.devices()[0].device_kind, "devices": mesh.size, "mesh": axes, "experts": cfg.num_experts,
           "hidden": cfg.hidden_size, "batch": batch, "seq_len": args.seq_len, "loss": float(loss_value),
           "train_step_ms": 1e3 * step_s, "train_tokens_per_s": batch * args.seq_len / step_s,
           "train_peak_gib_per_device": train_peak, "plan_gib_per_device": planned_gib,
           "collective_ms_per_round_trip": 1e3 * comm,
           "collective_share": (2 * moe_layers * comm) / step_s,
           "prefill_ms": 1e3 * prefill_s, "prefill_tokens_per_s": batch * args.seq_len / prefill_s,
           "decode_ms_per_token": 1e3 * decode_s, "decode_context": args.context}
    rows.append(row)
    print(json.dumps(row))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "full_width.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    print(f"\n{'mesh':>12} {'E':>3} {'B x T':>11} {'step ms':>9} {'tok/s':>9} {'peak GiB':>9} {'plan GiB':>9} "
          f"{'comm %':>7} {'prefill tok/s':>14} {'decode ms':>10}")
    print(f"{','.join(f'{k}={v}' for k, v in axes.items()):>12} {cfg.num_experts:>3} {batch:>4} x {args.seq_len:<5} "
          f"{row['train_step_ms']:9.1f} {row['train_tokens_per_s']:9,.0f} {train_peak:9.2f} {planned_gib:9.2f} "
          f"{100 * row['collective_share']:6.1f}% {row['prefill_tokens_per_s']:14,.0f} "
          f"{row['decode_ms_per_token']:10.2f}")


if __name__ == "__main__":
    main()
