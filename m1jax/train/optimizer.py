"""AdamW as M1 trained it (betas 0.9/0.95, eps configurable: the paper used 1e-15), warmup then decay, global-norm
clipping, weight decay masked off norms and the embedding."""
from __future__ import annotations

import dataclasses

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    total_steps: int = 1000
    schedule: str = "cosine"  # decay after warmup: "cosine", "linear" or "constant"
    final_lr_fraction: float = 0.1  # learning rate at the last step, as a fraction of the peak
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OptimizerConfig.schedule={self.schedule!r}; choose one of {SCHEDULES}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning rate must be positive, got {self.learning_rate}")
        if self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError(f"total_steps={self.total_steps} must be >= 1 and warmup_steps={self.warmup_steps} >= 0")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, cfg.total_steps)
    decay_steps = max(cfg.total_steps - warmup, 1)
    final = cfg.learning_rate * cfg.final_lr_fraction
    decay = {
        "cosine": optax.cosine_decay_schedule(cfg.learning_rate, decay_steps, alpha=cfg.final_lr_fraction),
        "linear": optax.linear_schedule(cfg.learning_rate, final, decay_steps),
        "constant": optax.constant_schedule(cfg.learning_rate),
    }[cfg.schedule]
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), decay], [warmup])


def decay_mask(params) -> dict:
    """True where weight decay applies: matrices and expert stacks, not norm scales and not the embedding table."""
    def keep(path, _):
        names = [getattr(k, "key", "") for k in path]
        return not (names[-1] == "scale" or names[0] == "embed")
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
