"""The training loop: data -> jitted sharded step -> metrics.jsonl, progress, checkpoints, exact resume.

Rerunning the same command on the same output directory resumes from the latest complete checkpoint: the state,
the optimizer, the RNG and the data position are restored, so the losses equal an uninterrupted run's bit for bit.
A checkpoint is written every `checkpoint_every` steps and always at the final step, so every finished run can be
loaded (generate, convert, rl) and resumed. With `progress` on, the loop says on stderr what it is doing
("resuming from step N of OUT", "compiling ...") and draws a tqdm bar with an ETA on a terminal.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from m1jax.config import M1Config, RunPolicy
from m1jax.flops import peak_flops_per_device, train_flops
from m1jax.model import M1ForCausalLM
from m1jax.progress import progress_bar
from m1jax.train import harness
from m1jax.train.data import make_data
from m1jax.train.optimizer import OptimizerConfig
from m1jax.train.step import BATCH_KEYS, TrainState, init_state, make_eval_step, make_train_step

RUN_CONFIG_FILE = "run_config.json"


@dataclasses.dataclass
class TrainConfig:
    out: str
    preset: str = "tiny"
    data: str = "mqar"  # a built-in task ("mqar", "copy", "arith") or a tokens.bin path
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 128
    seed: int = 0
    checkpoint_every: int = 100  # steps between checkpoints; the final step is always saved (0: only the final step)
    keep_checkpoints: int = 3  # >= 1: the newest checkpoints kept
    log_every: int = 1
    eval_every: int = 0  # task accuracy on a held-out batch every N steps (0: only at the end)
    microbatches: int = 1
    policy: RunPolicy = RunPolicy()  # dtypes, remat, ...: may change when a run resumes (the model may not)
    mesh: dict[str, int] | None = None
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    logit_z_loss_coef: float = 0.0  # + coef * mean(logsumexp(logits)^2) over graded tokens (m1jax.train.step)
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # M1Config fields over the preset's
    task_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    progress: bool = True
    tensorboard: bool = False  # also write TensorBoard events under out/tensorboard (needs tensorboardX)

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "keep_checkpoints", "log_every", "microbatches"):
            harness.check_count(getattr(self, name), name, 1)
        for name in ("checkpoint_every", "eval_every", "seed"):
            harness.check_count(getattr(self, name), name, 0)
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ValueError(f"out={self.out!r} is a file, not a directory; pass a new or existing directory")


@dataclasses.dataclass
class TrainResult:
    config: M1Config
    state: TrainState
    history: list[dict]
    final_eval: dict
    resumed_from: int | None


def model_config_for(cfg: TrainConfig) -> M1Config:
    return M1Config.from_preset(cfg.preset, **cfg.model_overrides)


def _host_metrics(metrics: dict) -> dict:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


def _shardings(model_config: M1Config, cfg: TrainConfig, abstract_state: TrainState, optimizer):
    """(mesh, state shardings, batch sharding) or Nones on a single device without a mesh."""
    if not cfg.mesh:
        return None, None, None
    from m1jax import sharding
    if cfg.batch_size % cfg.microbatches:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by --microbatches {cfg.microbatches}")
    micro = cfg.batch_size // cfg.microbatches
    mesh, state_shardings = harness.mesh_for(cfg.mesh, model_config, abstract_state, optimizer, micro)
    return mesh, state_shardings, sharding.batch_sharding(mesh, micro)


def train(cfg: TrainConfig, callback: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Run (or resume) a training run into cfg.out. callback(step, metrics) after each logged step."""
    model_config = model_config_for(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    data = make_data(cfg.data, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
                     vocab_size=model_config.vocab_size, max_seq_len=model_config.max_position_embeddings,
                     **cfg.task_options)
    eval_data = make_data(cfg.data, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                          seed=cfg.seed + harness.HELD_OUT_SEED_OFFSET, vocab_size=model_config.vocab_size,
                          **cfg.task_options)
    opt_cfg, optimizer, schedule = harness.optimizer_for(cfg.optimizer, cfg.steps)
    model = M1ForCausalLM(model_config, cfg.policy)

    abstract_state = jax.eval_shape(lambda: init_state(model, optimizer, cfg.seed))
    mesh, state_shardings, batch_sharding = _shardings(model_config, cfg, abstract_state, optimizer)
    model = model.clone(mesh=mesh)  # its MoE layers dispatch expert-parallel over the mesh (None: one device)
    # Parameter shapes do not depend on the mesh: initialise (or restore) outside it, placed by the shardings.
    harness.check_same_model(cfg.out, model_config)
    from m1jax.plan import check_fits  # MemoryError with the plan's figures, before anything compiles
    check_fits(model_config, cfg.mesh or {}, batch_size=cfg.batch_size // cfg.microbatches, seq_len=cfg.seq_len,
               policy=cfg.policy)
    checkpoints = harness.checkpoints(cfg.out, cfg.keep_checkpoints)
    restored = harness.resume(checkpoints, abstract_state, state_shardings, out=cfg.out, steps=cfg.steps,
                              quiet=not cfg.progress)
    if restored is not None:
        start, state, meta = restored
        data.restore(meta["data"])
    else:
        init = jax.jit(lambda: init_state(model, optimizer, cfg.seed), out_shardings=state_shardings)
        start, state = 0, init()
    train_step = make_train_step(model, optimizer, logit_z_loss_coef=cfg.logit_z_loss_coef,
                                 microbatches=cfg.microbatches, state_shardings=state_shardings,
                                 batch_sharding=batch_sharding)
    evaluate = make_eval_step(model)
    with harness.mesh_context(mesh):
        # What the run really used: the schedule's total_steps is the run's steps.
        harness.write_run_files(cfg.out, model_config, RUN_CONFIG_FILE, dataclasses.replace(cfg, optimizer=opt_cfg))
        lead = jax.process_index() == 0  # on several hosts, one draws the bar
        step_flops = train_flops(model_config, cfg.seq_len, cfg.batch_size)
        peak = peak_flops_per_device(jax.devices()[0].device_kind)
        peak = peak * jax.device_count() if peak else None
        progress = progress_bar(cfg.steps, desc="train", unit="step", initial=min(start, cfg.steps),
                                quiet=not (cfg.progress and lead), plain_every=max(cfg.steps // 10, 1))
        history: list[dict] = []
        last_time, last_step = time.perf_counter(), start
        try:
            with harness.run_log(cfg.out, start, cfg.tensorboard) as run_log:
                for step in range(start, cfg.steps):
                    batch = harness.to_device({k: v for k, v in next(data).items() if k in BATCH_KEYS},
                                              batch_sharding)
                    if step == start:
                        progress.write(f"compiling the train step ({model_config.num_layers} layers, batch "
                                       f"{cfg.batch_size} x {cfg.seq_len} tokens); the first step takes longer ...")
                        compile_start = time.perf_counter()
                    state, metrics = train_step(state, batch)
                    done = step + 1
                    if step == start:
                        jax.block_until_ready(metrics)
                        progress.write(f"first step done in {time.perf_counter() - compile_start:.1f}s "
                                       "(compilation included)")
                    if harness.checkpoint_due(done, cfg.checkpoint_every, cfg.steps):
                        checkpoints.save(done, state, {"data": data.state(), "step": done})
                    if done % cfg.log_every and done != cfg.steps:
                        progress.update(1)
                        continue
                    record = _host_metrics(metrics)
                    now = time.perf_counter()
                    seconds = (now - last_time) / max(done - last_step, 1)
                    last_time, last_step = now, done
                    record.update(step=done, lr=float(schedule(step)), step_seconds=seconds,
                                  tokens_per_s=cfg.batch_size * cfg.seq_len / seconds,
                                  mfu=(step_flops / seconds / peak) if peak else None)
                    if cfg.eval_every and done % cfg.eval_every == 0 and hasattr(data, "accuracy"):
                        record.update(_evaluate(evaluate, state.params, eval_data))
                    run_log.write(record)
                    history.append(record)
                    progress.update(1, loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                                    **({"mfu": f"{100 * record['mfu']:.1f}%"} if record["mfu"] is not None else {}))
                    if callback is not None:
                        callback(done, record)
        finally:
            progress.close()
            checkpoints.close()
        final_eval = _evaluate(evaluate, state.params, eval_data) if hasattr(eval_data, "accuracy") else {}
    return TrainResult(model_config, state, history, final_eval, start if restored else None)


def _evaluate(evaluate, params, eval_data) -> dict:
    batch = eval_data.batch(0)
    predictions = evaluate(params, {k: jnp.asarray(v) for k, v in batch.items()})
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        predictions = multihost_utils.process_allgather(predictions, tiled=True)
    predictions = np.asarray(predictions)
    return {f"eval_{k}": float(v) for k, v in eval_data.accuracy(predictions, batch).items()}
