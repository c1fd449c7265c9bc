"""`make demo`: the "small" hybrid (7 lightning + 1 softmax layers, 32 experts top-2) learns multi-query associative
recall on the CPU in about two minutes; then its recall accuracy, routing statistics, a checkpoint and samples.

Everything is built in (no downloads). Output lands in runs/demo (rerunning resumes from its checkpoint).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from m1jax.config import M1Config
from m1jax.params import params_table

OUT = os.environ.get("M1JAX_DEMO_OUT", os.path.join("runs", "demo"))
STEPS = int(os.environ.get("M1JAX_DEMO_STEPS", "120"))


def main() -> int:
    from m1jax.train.loop import TrainConfig, train
    from m1jax.train.optimizer import OptimizerConfig

    config = M1Config.from_preset("small")
    print("== m1jax demo: the 'small' preset ==")
    print(params_table(config))
    cfg = TrainConfig(out=OUT, preset="small", data="mqar", steps=STEPS, batch_size=16, seq_len=128,
                      checkpoint_every=STEPS // 2, log_every=10, eval_every=0,
                      optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=10, eps=1e-8),
                      task_options={"num_pairs": 8})
    print(f"\n== training on mqar (multi-query associative recall), {STEPS} steps, batch 16 x 128 tokens ==")
    start = time.perf_counter()
    result = train(cfg)
    elapsed = time.perf_counter() - start
    for record in result.history:
        print(f"step {record['step']:4d}  loss {record['loss']:.4f}  grad-norm {record['grad_norm']:.3f}  "
              f"tok/s {record['tokens_per_s']:,.0f}")
    print(f"trained in {elapsed:.0f}s; checkpoint and metrics.jsonl in {OUT}")
    print(f"held-out recall accuracy: {100 * result.final_eval.get('eval_accuracy', float('nan')):.1f}% "
          f"(token accuracy {100 * result.final_eval.get('eval_token_accuracy', float('nan')):.1f}%)")
    _routing_summary(result)
    _samples(result)
    return 0


def _routing_summary(result) -> None:
    import jax
    import jax.numpy as jnp

    from m1jax.model import M1ForCausalLM
    from m1jax.train.data import make_data

    data = make_data("mqar", batch_size=4, seq_len=128, seed=7, vocab_size=result.config.vocab_size, num_pairs=8)
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
    try:
        from m1jax.inference.engine import generate
    except ImportError:
        return
    import jax.numpy as jnp

    from m1jax.train.data import make_data
    data = make_data("mqar", batch_size=2, seq_len=128, seed=11, vocab_size=result.config.vocab_size, num_pairs=8)
    batch = data.batch(0)
    graded = np.flatnonzero(batch["loss_mask"][0])
    if graded.size == 0:
        return
    cut = int(graded[0]) + 1  # prompt: the pairs and the first query key
    prompt = jnp.asarray(batch["inputs"][:, :cut])
    out = generate(result.config, result.state.params, prompt, max_new_tokens=1)
    print("\n== greedy recall of the first query (model vs answer) ==")
    for row in range(prompt.shape[0]):
        print(f"query key {int(prompt[row, -1])}: model says {int(out.tokens[row, -1])}, "
              f"answer {int(batch['targets'][row, cut - 1])}")


if __name__ == "__main__":
    sys.exit(main())
