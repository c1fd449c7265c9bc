"""Training checkpoints with orbax: asynchronous saves every N steps, the last K kept, the data position and the
config saved beside the state, and every load falling back past damaged checkpoints.

A torn or partial checkpoint (a crash mid-write leaves orbax's temporary folder, which is never listed) is invisible;
a finished one that fails to restore (a truncated or corrupt file) is reported in one line naming its step and file
and the previous one is used. Orbax, absl and asyncio log every failed read with long tracebacks: they are silenced
around each attempt unless M1JAX_VERBOSE=1 (the CLI's --verbose). When nothing restores, `CheckpointError` (a
ValueError) lists every step tried and why.

Readers of a training output (`load_training_output`, `load_any`, used by generate, convert and rl init) restore
the parameters only: the optimizer state is never read.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

VERBOSE_ENV = "M1JAX_VERBOSE"
_NOISY_LOGGERS = ("absl", "orbax", "asyncio", "tensorstore", "jax._src.distributed")


class CheckpointError(ValueError):
    """A checkpoint (orbax step or safetensors file) that cannot be read; the message names the step or file."""


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextlib.contextmanager
def quiet_libraries():
    """Silence the loggers of orbax/absl/asyncio (they print whole tracebacks for each failed read) inside."""
    if verbose():
        yield
        return
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _report(message: str) -> None:
    print(f"m1jax: {message}", file=sys.stderr, flush=True)


def describe_failure(step_dir: str, err: BaseException) -> str:
    """One line: the file (or array) that failed and the library's reason, without its traceback."""
    texts = []
    while err is not None and len(texts) < 8:  # the innermost cause holds the reason
        texts.append(str(err))
        err = err.__cause__ or err.__context__
    reason = next((t for t in reversed(texts) if t.strip()), "unknown error")
    reason = reason.strip().splitlines()[0][:300]
    where = step_dir
    array = re.search(r'Error reading "([^"]+)"', reason)
    size = re.search(r"value of size (\d+)", reason)
    if size:  # a truncated file: name the file under the step holding exactly that many bytes
        hits = [os.path.join(d, f) for d, _, files in os.walk(step_dir) for f in files
                if os.path.getsize(os.path.join(d, f)) == int(size.group(1))]
        if len(hits) == 1:
            where = hits[0]
    if array:
        where += f" (array {array.group(1)})"
    missing = re.search(r"(/[^\s'\"]+) (?:does not exist|not found)|No such file or directory: '([^']+)'", reason)
    if missing and where == step_dir:
        where = missing.group(1) or missing.group(2)
    return f"{where}: {reason}"


class TrainCheckpoints:
    """directory/<step>/{state, meta}: state is the TrainState pytree, meta a JSON dict (data position, config).

    report(line) receives the one-line notice of each damaged checkpoint skipped (default: stderr).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
                 report: Callable[[str], None] | None = None):
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep={keep!r}: the number of checkpoints kept must be an integer >= 1")
        self.directory = os.path.abspath(os.fspath(directory))
        self.report = report or _report
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        with quiet_libraries():
            self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _newest_good(self, restore_one: Callable[[int], Any], steps: list[int] | None = None) -> tuple[int, Any] | None:
        """(step, restore_one(step)) for the newest step that restores; a one-line report for each one that does
        not. None when there is no checkpoint; CheckpointError when there are some and none restores."""
        self.manager.wait_until_finished()
        steps = self.steps() if steps is None else steps
        failures = []
        for step in reversed(steps):
            try:
                with quiet_libraries():
                    return step, restore_one(step)
            except Exception as err:  # a damaged checkpoint must never stop a load: fall back to an older one
                if verbose():
                    import traceback
                    traceback.print_exc()
                line = describe_failure(self.step_dir(step), err)
                failures.append(f"step {step}: {line}")
                older = [s for s in steps if s < step]
                self.report(f"checkpoint at step {step} is unreadable ({line}); "
                            + (f"falling back to step {older[-1]}" if older else "no older checkpoint"))
        if failures:
            raise CheckpointError(f"no checkpoint in {self.directory} can be read: " + "; ".join(failures))
        return None

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest checkpoint that restores, or None when there is none.

        abstract_state: a pytree of jax.ShapeDtypeStruct (with shardings) telling where each leaf goes.
        """
        def restore_one(step):
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            if restored.meta is None or restored.state is None:
                raise CheckpointError("incomplete: its state or meta is missing")
            return restored

        found = self._newest_good(restore_one)
        if found is None:
            return None
        step, restored = found
        return step, restored.state, dict(restored.meta)

    def restore_params(self, step: int | None = None) -> tuple[int, Any]:
        """(step, params) of the newest readable checkpoint (or exactly `step`), reading only the parameters.

        Leaves land on the first device with their saved shapes and dtypes.
        """
        steps = self.steps()
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"no checkpoint at step {step} in {self.directory}; available: {steps}")
            steps = [step]
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

        def restore_one(s):
            path = os.path.join(self.step_dir(s), "state")
            checkpointer = ocp.PyTreeCheckpointer()
            tree = checkpointer.metadata(path).item_metadata
            if "params" not in tree:
                raise CheckpointError(f"{path} holds no 'params'")
            target = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                             tree["params"])}
            restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
            restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True))
            return restored["params"]

        return self._newest_good(restore_one, steps)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (keeping shardings) of a pytree of arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


def load_training_output(out_dir: str | os.PathLike, step: int | None = None):
    """(M1Config, params) from a training output directory (model_config.json + checkpoints/), latest readable step
    by default (a damaged newer one is reported in one line and skipped). Only the parameters are read."""
    from m1jax.config import M1Config

    out_dir = os.fspath(out_dir)
    config_path = os.path.join(out_dir, "model_config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{out_dir} is not a training output: it has no model_config.json")
    config = M1Config.from_hf(config_path)
    checkpoints = TrainCheckpoints(os.path.join(out_dir, "checkpoints"), async_save=False)
    try:
        if not checkpoints.steps():
            raise FileNotFoundError(f"{out_dir}/checkpoints holds no checkpoint; train with --checkpoint-every N")
        _, params = checkpoints.restore_params(step)
    finally:
        checkpoints.close()
    return config, params
