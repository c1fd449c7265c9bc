"""`make demo`: the "small" hybrid (7 lightning + 1 softmax layers, 32 experts top-2, 103M parameters) trains on
multi-query associative recall on the CPU for about two minutes; then its recall accuracy against chance, routing
statistics, a checkpoint and greedy samples.

Everything is built in (no downloads). Output lands in runs/demo; a rerun resumes from its checkpoint
(M1JAX_DEMO_STEPS=200 make demo trains on to step 200). Two minutes on two cores is ~60 steps of 512
tokens: enough to learn the task's token statistics, not yet recall (that takes hundreds of steps: see
experiments/hybrid_ablation).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from m1jax.config import M1Config
from m1jax.params import params_table

OUT = os.environ.get("M1JAX_DEMO_OUT", os.path.join("runs", "demo"))
STEPS = int(os.environ.get("M1JAX_DEMO_STEPS", "60"))
PAIRS = 4


def main() -> int:
    from m1jax.train.loop import TrainConfig, train
    from m1jax.train.optimizer import OptimizerConfig

    config = M1Config.from_preset("small")
    print("== m1jax demo: the 'small' preset ==")
    print(params_table(config))
    cfg = TrainConfig(out=OUT, preset="small", data="mqar", steps=STEPS, batch_size=8, seq_len=64,
                      checkpoint_every=max(STEPS // 2, 1), log_every=10, eval_every=0,
                      optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=STEPS // 10),
                      task_options={"num_pairs": PAIRS},
                      model_overrides={"router_aux_loss_coef": 0.01})  # Switch's 0.01: small routers collapse at 0.001
    print(f"\n== training on mqar (multi-query associative recall, {PAIRS} key-value pairs), {STEPS} steps, "
          f"batch 8 x 64 tokens ==")
    start = time.perf_counter()
    result = train(cfg)
    elapsed = time.perf_counter() - start
    for record in result.history:
        print(f"step {record['step']:4d}  loss {record['loss']:.4f}  grad-norm {record['grad_norm']:.3f}  "
              f"tok/s {record['tokens_per_s']:,.0f}")
    print(f"trained in {elapsed:.0f}s; checkpoint and metrics.jsonl in {OUT}")
    from m1jax.train.tasks import get_task
    task = get_task("mqar", num_pairs=PAIRS)
    chance = 1.0 / (task.vocab_size - task.first_value_id)  # a uniform guess among the value ids
    print(f"held-out recall accuracy: {100 * result.final_eval.get('eval_accuracy', float('nan')):.1f}% "
          f"(chance {100 * chance:.1f}%)")
    _routing_summary(result)
    _samples(result)
    return 0


def _routing_summary(result) -> None:
    import jax
    import jax.numpy as jnp

    from m1jax.model import M1ForCausalLM
    from m1jax.train.data import make_data

    data = make_data("mqar", batch_size=4, seq_len=64, seed=7, vocab_size=result.config.vocab_size,
                     num_pairs=PAIRS)
    batch = data.batch(0)
    out = jax.jit(lambda p, x, s: M1ForCausalLM(result.config).apply({"params": p}, x, segment_ids=s))(
        result.state.params, jnp.asarray(batch["inputs"]), jnp.asarray(batch["segment_ids"]))
    counts = np.asarray(out.routing["tokens_per_expert"])
    entropy = np.asarray(out.routing["router_entropy"])
    print("\n== routing (held-out batch): per layer, busiest / idlest expert load (1.0 = even), router entropy ==")
    for layer, kind in enumerate(result.config.layer_types):
        load = counts[layer] / counts[layer].sum() * counts.shape[1]
        print(f"layer {layer} ({kind:9s})  max {load.max():.2f}  min {load.min():.2f}  "
              f"unused experts {int((counts[layer] == 0).sum()):2d}  entropy {entropy[layer]:.2f} nats")


def _samples(result) -> None:
    from m1jax.inference import generate
    from m1jax.model import M1ForCausalLM
    from m1jax.train.data import make_data

    data = make_data("mqar", batch_size=2, seq_len=64, seed=11, vocab_size=result.config.vocab_size,
                     num_pairs=PAIRS)
    batch = data.batch(0)
    print("\n== greedy recall of each row's first query (the prompt is the pairs and the query key) ==")
    for row in range(2):
        graded = np.flatnonzero(batch["loss_mask"][row])
        cut = int(graded[0]) + 1
        out = generate(M1ForCausalLM(result.config), result.state.params, [batch["inputs"][row, :cut].tolist()],
                       max_new_tokens=1)
        print(f"query key {int(batch['inputs'][row, cut - 1])}: model says {int(out.tokens[0, -1])}, "
              f"answer {int(batch['targets'][row, cut - 1])}")


if __name__ == "__main__":
    sys.exit(main())
