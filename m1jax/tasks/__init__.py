"""Built-in research tasks that need no download, shared by pretraining (m1jax.train.data) and RL (m1jax.rl).

- mqar, copy (recall.py): recall over small integer vocabularies; mqar is the canonical hybrid ablation.
- arith (arith.py): byte-level arithmetic text, packed rows for pretraining and (prompt, answer) pairs for RL.
- chains (chains.py): long additions with their carries written out (reasoning chains with one correct path).
- countdown (countdown.py): reach a target from a few numbers; responses are randomized search traces that branch
  and back out (Stream-of-Search), for pretraining and for RL (`CountdownPrompts`).

base.py holds the shared batch layout (inputs / targets / loss_mask / segment_ids, each (B, T)) and the rule that
makes every batch seekable: row b of step s depends only on (seed, s, b, seq_len).
"""
from __future__ import annotations

import dataclasses

from m1jax.tasks.arith import ARITH_OPS, MAX_ARITH_DIGITS, Arith, arith_problem, score_arith
from m1jax.tasks.base import PAD_ID, Task, row_rng, token_accuracy
from m1jax.tasks.chains import Chains
from m1jax.tasks.countdown import Countdown
from m1jax.tasks.recall import MQAR, Copy

TASKS = {"mqar": MQAR, "copy": Copy, "arith": Arith, "chains": Chains, "countdown": Countdown}


def build_task(registry: dict, name: str, options: dict):
    """registry[name](**options), refusing options the task's dataclass does not have (named in the error)."""
    allowed = {f.name for f in dataclasses.fields(registry[name])}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"task {name!r} has no option(s) {unknown}; its options are {sorted(allowed)}")
    return registry[name](**options)


def get_task(name: str, **options) -> Task:
    """A task by name with its options, e.g. get_task("mqar", num_pairs=16, vocab=128)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return build_task(TASKS, name, options)


__all__ = ["ARITH_OPS", "MAX_ARITH_DIGITS", "MQAR", "PAD_ID", "TASKS", "Arith", "Copy", "Task", "arith_problem",
           "build_task", "get_task", "row_rng", "score_arith", "token_accuracy"]
