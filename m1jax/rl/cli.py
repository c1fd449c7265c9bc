"""`m1jax rl`: CISPO (or GRPO, DAPO, PPO-clip) on a task with verifiable answers, from a trained checkpoint.

    m1jax rl --init CKPT --task arith --algo cispo|grpo|dapo|ppo --steps N --out DIR [--group-size G]
             [--prompts-per-step N] [--updates-per-batch U] [--max-new-tokens T] [--lr LR] [--eps-high E]
             [--temperature T] [--seed S] [--checkpoint-every K]

Options read when the parser defines them (defaults otherwise): --digits, --ops (arith), --eval-every,
--eval-prompts, --mesh, --kl-beta (GRPO; default 0.04), --dynamic-sampling on|off, --sampler-dtype, --sampler-lm-head
float32|compute, --sampler-logprobs decode|forward, --old-logprobs trainer|sampler, --weight-decay, --adam-eps,
--keep. Rerunning the same command on the same --out resumes from the latest checkpoint. Prints one JSON summary.
"""
from __future__ import annotations

import json

from m1jax.rl.rollout import RolloutConfig
from m1jax.rl.trainer import LossConfig, RLConfig, train_rl
from m1jax.train.optimizer import OptimizerConfig


def _mesh(text: str | None) -> dict[str, int] | None:
    if not text:
        return None
    mesh = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        if not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"--mesh part {part!r}: write axis=size, e.g. data=2,expert=4")
        mesh[name.strip()] = int(size)
    return mesh


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
        eval_every=opt("eval_every", 0), eval_prompts=opt("eval_prompts", 128), mesh=_mesh(opt("mesh")))


def rl_main(args) -> int:
    cfg = config_from_args(args)
    result = train_rl(cfg)
    last = result.history[-1] if result.history else {}
    summary = {"steps": cfg.steps, "algo": cfg.loss.algo, "resumed_from": result.resumed_from,
               "out": cfg.out, **{k: last[k] for k in ("reward_mean", "accuracy", "eval_accuracy") if k in last}}
    print(json.dumps(summary))
    return 0
