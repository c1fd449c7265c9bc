"""A run's per-step log: metrics.jsonl (one JSON object per step) and, when asked, TensorBoard event files.

Pretraining and RL both write through `RunLog`. On resume from step S the lines of steps > S are dropped (the
resumed run recomputes them), and TensorBoard is told to discard its events from step S + 1 on, so neither log
holds a step twice.
"""
from __future__ import annotations

import json
import math
import os

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def truncate_metrics(path: str, upto_step: int) -> None:
    """Keep metrics lines of steps <= upto_step (a resumed run recomputes the later ones)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= upto_step]
    with open(path, "w") as f:
        f.writelines(kept)


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The record's numbers as {tag: value}; nested dicts become "outer/inner" tags; None, text and "step" skipped."""
    out = {}
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, prefix=f"{tag}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            out[tag] = float(value)
    return out


class RunLog:
    """Appends one record per step. out: the run directory; start_step: the step the run resumes from (0: new).

    suffix names a non-lead host's file (metrics.jsonl.1, ...); only the lead host writes TensorBoard events.
    """

    def __init__(self, out: str, start_step: int, *, tensorboard: bool = False, suffix: str = ""):
        self.path = os.path.join(out, METRICS_FILE + suffix)
        truncate_metrics(self.path, start_step)
        self._file = open(self.path, "a")
        self._writer = None
        if tensorboard and not suffix:
            self._writer = _summary_writer(os.path.join(out, TENSORBOARD_DIR), purge_step=start_step + 1)

    def write(self, record: dict) -> None:
        """record: a flat or nested dict of numbers with an integer "step"."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for tag, value in scalars(record).items():
                if math.isfinite(value):
                    self._writer.add_scalar(tag, value, global_step=record["step"])
            self._writer.flush()

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_tensorboard_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} from a TensorBoard directory, as TensorBoard shows it: files oldest first, and a
    SessionLog START at step s (a resumed run's purge marker) drops the earlier events of steps >= s."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    result: dict[str, list[tuple[int, float]]] = {}
    paths = sorted((os.path.join(logdir, name) for name in os.listdir(logdir)), key=os.path.getmtime)
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):  # TFRecord framing: u64 length, u32 crc, payload, u32 crc
            length = int.from_bytes(data[offset:offset + 8], "little")
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 16 + length
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                result = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in result.items()}
            for value in event.summary.value:
                result.setdefault(value.tag, []).append((event.step, value.simple_value))
    return result


def _summary_writer(logdir: str, purge_step: int):
    try:
        from tensorboardX import SummaryWriter
    except ImportError as err:
        raise ImportError("tensorboard=True writes events with tensorboardX: pip install 'm1jax[tensorboard]' "
                          "(or drop --tensorboard)") from err
    return SummaryWriter(logdir, purge_step=purge_step)
