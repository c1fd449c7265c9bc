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

from m1jax.rl.rollout import RL_TASKS, RolloutConfig
from m1jax.rl.trainer import LossConfig, RLConfig, progress_fields, train_rl
from m1jax.sharding import parse_mesh
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
    from m1jax.cli_args import SEED, count, mesh_spec, real  # the command line's checked number types
    p.add_argument("--init", required=True, help="a training output or HF checkpoint to start from")
    p.add_argument("--task", default="arith", choices=sorted(RL_TASKS), help="a task with verifiable answers")
    p.add_argument("--algo", default="cispo", choices=["cispo", "grpo", "dapo", "ppo"], help="the policy loss")
    p.add_argument("--steps", type=count(1), default=20, help="generation batches")
    p.add_argument("--out", required=True, help="the run directory; rerunning on it resumes")
    p.add_argument("--group-size", type=count(2), default=8, help="samples per prompt")
    p.add_argument("--prompts-per-step", type=count(1), default=8, help="prompts per generation batch")
    p.add_argument("--updates-per-batch", type=count(1), default=4, help="off-policy updates per generation batch")
    p.add_argument("--max-new-tokens", type=count(1), default=16, help="response length limit")
    p.add_argument("--lr", type=real(0, 10, low_open=True), default=1e-4, help="learning rate")
    p.add_argument("--eps-high", type=real(0, 100), default=0.28, help="upper clip of the IS weight (CISPO) / ratio")
    p.add_argument("--kl-beta", type=real(0, 100), help="GRPO's KL coefficient (default 0.04; none for the others)")
    p.add_argument("--temperature", type=real(0, 100, low_open=True), default=1.0, help="sampling temperature")
    p.add_argument("--seed", type=SEED, default=0, help="prompt and sampling seed")
    p.add_argument("--checkpoint-every", type=count(0), default=0,
                   help="generation batches between checkpoints; the final step is always saved (0: final only)")
    p.add_argument("--keep", type=count(1), default=3, help="newest checkpoints kept")
    p.add_argument("--digits", type=count(1), help="arith: operand digits (default: the task's)")
    p.add_argument("--ops", help="arith: operators, e.g. '+-*' (default: the task's)")
    p.add_argument("--eval-every", type=count(0), default=0,
                   help="steps between held-out evaluations (0: at the start and the end)")
    p.add_argument("--eval-prompts", type=count(0), default=128, help="held-out prompts per evaluation (0: none)")
    p.add_argument("--mesh", type=mesh_spec, help="e.g. data=2,expert=2 (default: one device)")
    p.add_argument("--dynamic-sampling", choices=["on", "off"], help="DAPO's filter (default: on for dapo)")
    p.add_argument("--sampler-dtype", choices=["float32", "bfloat16"],
                   help="the rollout engine's compute dtype (default: the model's)")
    p.add_argument("--sampler-lm-head", choices=["float32", "compute"],
                   help="float32: the paper's mismatch fix (default: the model's)")
    p.add_argument("--sampler-logprobs", choices=["decode", "forward"], default="decode",
                   help="where the sampler's log-probabilities come from")
    p.add_argument("--old-logprobs", choices=["trainer", "sampler"], default="trainer",
                   help="which log-probabilities the importance weights divide by")
    p.add_argument("--warmup", type=count(0), default=0, help="linear warmup (optimizer updates)")
    p.add_argument("--weight-decay", type=real(0, 10), default=0.0, help="AdamW weight decay")
    p.add_argument("--adam-eps", type=real(0, 1, low_open=True), default=1e-15, help="the paper's AdamW eps")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events to OUT/tensorboard")
    return p


def config_from_args(args) -> RLConfig:
    """An RLConfig from parsed `m1jax rl` arguments (options the parser lacks take their defaults); --quiet turns
    the trainer's notices off."""
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
        eval_every=opt("eval_every", 0), eval_prompts=opt("eval_prompts", 128), mesh=_mesh(opt("mesh")),
        tensorboard=bool(opt("tensorboard", False)), progress=not opt("quiet", False))


def _mesh(value) -> dict[str, int] | None:
    return value if isinstance(value, dict) else parse_mesh(value)


def rl_main(args) -> int:
    """Run `m1jax rl` with arguments parsed (and the RLConfig built) by `m1jax.cli.parse_args`."""
    from m1jax.progress import progress_bar, status
    cfg = args.run_config
    quiet = not cfg.progress
    status(f"loading {cfg.init} and compiling the sampler and the update (the first step takes longer) ...",
           quiet=quiet)
    bar = None  # a bar on a terminal, a line per step in a log; it opens where the trainer resumed

    def callback(step: int, record: dict) -> None:
        nonlocal bar
        if bar is None:
            bar = progress_bar(cfg.steps, desc=f"rl {cfg.loss.algo}", unit="step", initial=step - 1, quiet=quiet,
                               plain_every=1)
        bar.update(1, **progress_fields(record))

    try:
        result = train_rl(cfg, callback=callback)
    finally:
        if bar is not None:
            bar.close()
    last = result.history[-1] if result.history else {}
    summary = {"steps": cfg.steps, "algo": cfg.loss.algo, "resumed_from": result.resumed_from,
               "out": cfg.out, **{k: last[k] for k in ("reward_mean", "accuracy", "eval_accuracy") if k in last}}
    print(json.dumps(summary))
    return 0
