"""`m1jax rl`: CISPO (or GRPO, DAPO, PPO-clip) on a task with verifiable answers, from a trained checkpoint.

    m1jax rl --init CKPT --task arith --algo cispo|grpo|dapo|ppo --steps N --out DIR [--group-size G]
             [--prompts-per-step N] [--updates-per-batch U] [--max-new-tokens T] [--lr LR] [--eps-high E]
             [--temperature T] [--seed S] [--checkpoint-every K]

Also: --digits, --ops (arith), --eval-every, --eval-prompts, --mesh, --kl-beta (GRPO; default 0.04),
--dynamic-sampling on|off, --sampler-dtype, --sampler-lm-head float32|compute, --sampler-logprobs decode|forward,
--old-logprobs trainer|sampler, --warmup, --weight-decay, --adam-eps, --keep. Rerunning the same command on the same
--out resumes from the latest checkpoint. Prints one JSON summary.
"""
from __future__ import annotations

import argparse
import json

from m1jax.rl.rollout import RolloutConfig
from m1jax.sharding import parse_mesh
from m1jax.rl.trainer import LossConfig, RLConfig, train_rl
from m1jax.train.optimizer import OptimizerConfig


def _on_off(value, name: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if value in ("on", "off"):
        return value == "on"
    raise ValueError(f"{name}={value!r}: pass on or off")


def _lm_head(value) -> bool | None:
    if value is None:
        return None
    if value not in ("float32", "compute"):
        raise ValueError(f"--sampler-lm-head={value!r}: pass float32 (the paper's fix) or compute (the compute dtype)")
    return value == "float32"


def add_rl_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--init", required=True, help="a training output or HF checkpoint to start from")
    p.add_argument("--task", default="arith")
    p.add_argument("--algo", default="cispo", choices=["cispo", "grpo", "dapo", "ppo"])
    p.add_argument("--steps", type=int, default=20, help="generation batches")
    p.add_argument("--out", required=True)
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt (G >= 2)")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--updates-per-batch", type=int, default=4, help="off-policy updates per generation batch")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eps-high", type=float, default=0.28)
    p.add_argument("--kl-beta", type=float, help="GRPO's KL coefficient (default 0.04; none for the others)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--digits", type=int, help="arith: operand digits")
    p.add_argument("--ops", help="arith: operators, e.g. '+-*'")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--eval-prompts", type=int, default=128)
    p.add_argument("--mesh", help="e.g. data=2,expert=2")
    p.add_argument("--dynamic-sampling", choices=["on", "off"], help="DAPO's filter (default: on for dapo)")
    p.add_argument("--sampler-dtype", choices=["float32", "bfloat16"], help="the rollout engine's compute dtype")
    p.add_argument("--sampler-lm-head", choices=["float32", "compute"], help="float32: the paper's mismatch fix")
    p.add_argument("--sampler-logprobs", choices=["decode", "forward"], default="decode")
    p.add_argument("--old-logprobs", choices=["trainer", "sampler"], default="trainer")
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--adam-eps", type=float, default=1e-15, help="the paper's AdamW eps")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events to OUT/tensorboard")
    return p


def config_from_args(args) -> RLConfig:
    """An RLConfig from parsed `m1jax rl` arguments (options the parser lacks take their defaults)."""
    opt = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    task_options = {k: opt(k) for k in ("digits", "ops") if opt(k) is not None}
    rollout = RolloutConfig(
        group_size=args.group_size, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        sampler_compute_dtype=opt("sampler_dtype"), sampler_float32_lm_head=_lm_head(opt("sampler_lm_head")),
        sampler_logprobs=opt("sampler_logprobs", "decode"), old_logprobs=opt("old_logprobs", "trainer"))
    loss = LossConfig(algo=args.algo, eps_high=args.eps_high, kl_beta=opt("kl_beta"))
    optimizer = OptimizerConfig(learning_rate=args.lr, warmup_steps=opt("warmup", 0) or 0, schedule="constant",
                                eps=opt("adam_eps", 1e-15), weight_decay=opt("weight_decay", 0.0))
    return RLConfig(
        out=args.out, init=args.init, task=args.task, task_options=task_options, steps=args.steps,
        prompts_per_step=args.prompts_per_step, updates_per_batch=args.updates_per_batch, rollout=rollout, loss=loss,
        dynamic_sampling=_on_off(opt("dynamic_sampling"), "--dynamic-sampling"), optimizer=optimizer,
        seed=args.seed, checkpoint_every=args.checkpoint_every, keep_checkpoints=opt("keep", 3),
        eval_every=opt("eval_every", 0), eval_prompts=opt("eval_prompts", 128), mesh=parse_mesh(opt("mesh")),
        tensorboard=bool(opt("tensorboard", False)))


def rl_main(args) -> int:
    cfg = config_from_args(args)
    result = train_rl(cfg)
    last = result.history[-1] if result.history else {}
    summary = {"steps": cfg.steps, "algo": cfg.loss.algo, "resumed_from": result.resumed_from,
               "out": cfg.out, **{k: last[k] for k in ("reward_mean", "accuracy", "eval_accuracy") if k in last}}
    print(json.dumps(summary))
    return 0
