"""What every built-in task shares: seekable row generators, the (B, T) batch layout, and token accuracy.

A task makes (B, T) batches that depend only on (seed, step, row, seq_len): row b of step s is drawn from its own
generator seeded by (seed, step, b), so any batch can be rebuilt without replaying the ones before it. A row is
one token sequence S of length <= T + 1, padded to T + 1; then

    inputs      (B, T) int32    S[:-1]
    targets     (B, T) int32    S[1:]  (the next tokens)
    loss_mask   (B, T) float32  1 where the target is graded
    segment_ids (B, T) int32    1 for real input tokens, 0 for padding
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Iterable

import numpy as np

PAD_ID = 0  # mqar and copy reserve id 0 for padding


def row_rng(seed: int, step: int, row: int) -> np.random.Generator:
    """The generator of one row: a pure function of (seed, step, row)."""
    return np.random.default_rng(np.random.SeedSequence([seed, step, row]))


def check_int(value, name: str, minimum: int, fix: str) -> int:
    """value as an int, or a ValueError naming `name`, the minimum and the fix."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}; {fix}")
    return int(value)


def graded_positions(predictions, batch: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predictions, targets, graded mask), each (B, T), after checking the predictions' shape."""
    predictions = np.asarray(predictions)
    targets = np.asarray(batch["targets"])
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions must have the targets' shape {targets.shape} (B, T) of token ids, got "
                         f"{predictions.shape}; take argmax over the vocab axis of the logits first")
    return predictions, targets, np.asarray(batch["loss_mask"]) > 0


def token_accuracy(predictions, batch: dict) -> dict:
    """Fraction of graded positions (loss_mask > 0) where the prediction equals the target."""
    predictions, targets, mask = graded_positions(predictions, batch)
    graded = int(mask.sum())
    correct = int(((predictions == targets) & mask).sum())
    accuracy = correct / graded if graded else float("nan")
    return {"accuracy": accuracy, "token_accuracy": accuracy, "graded_tokens": graded}


def pack_problems(problems: Iterable[tuple[str, str]], room: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte-level text problems packed into one row: (prompt, answer) pairs taken in order while prompt + answer
    still fits in the `room` bytes left (the first that does not fit ends the row; `problems` may be endless).
    Returns the ASCII byte ids (n,) int32 and a (n,) bool mask grading each answer."""
    parts, spans, used = [], [], 0
    for prompt, answer in problems:
        text = prompt + answer
        if used + len(text) > room:
            break
        parts.append(text)
        spans.append((used + len(prompt), used + len(text)))
        used += len(text)
    sequence = np.frombuffer("".join(parts).encode("ascii"), np.uint8).astype(np.int32)
    graded = np.zeros(len(sequence), bool)
    for start, stop in spans:
        graded[start:stop] = True
    return sequence, graded


def packed_texts(batch: dict) -> list[tuple[str, int]]:
    """A byte-level batch's rows as (text, number of graded tokens): the row's tokens (its first input, then the
    targets) with ids >= 256 (padding, specials) left out. For reading a packed batch back."""
    tokens = np.concatenate([np.asarray(batch["inputs"])[:, :1], np.asarray(batch["targets"])], axis=1)
    graded = np.asarray(batch["loss_mask"]) > 0
    return [(bytes(int(t) for t in row if t < 256).decode(), int(mask.sum())) for row, mask in zip(tokens, graded)]


def problem_accuracy(predictions, batch: dict) -> dict:
    """token_accuracy's metrics, with "accuracy" the fraction of problems (maximal runs of graded positions) whose
    every graded token is predicted right, and "problems" their count."""
    metrics = token_accuracy(predictions, batch)
    predictions, targets, mask = graded_positions(predictions, batch)
    starts = mask & ~np.pad(mask, ((0, 0), (1, 0)))[:, :-1]  # first graded position of each problem
    problem_of = np.cumsum(starts.reshape(-1)) - 1
    flat = mask.reshape(-1)
    wrong = (predictions != targets).reshape(-1) & flat
    count = int(starts.sum())
    wrong_per_problem = np.bincount(problem_of[flat], weights=wrong[flat], minlength=count)
    metrics["accuracy"] = float((wrong_per_problem == 0).sum() / count) if count else float("nan")
    metrics["problems"] = count
    return metrics


class Task(abc.ABC):
    """Shared batching and grading. A task sets `name` and `pad_id` and defines the three members below."""

    name: str
    pad_id: int = PAD_ID

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """The smallest model vocab the task needs (its largest id + 1)."""

    @property
    @abc.abstractmethod
    def min_seq_len(self) -> int:
        """The shortest seq_len the task, with its options, can fill."""

    @abc.abstractmethod
    def row(self, rng: np.random.Generator, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """One sequence S (length <= seq_len + 1) and a bool mask over S of the tokens graded as targets."""

    def batch(self, seed: int, step: int, batch_size: int, seq_len: int) -> dict:
        """The batch of `step`: a dict of (batch_size, seq_len) arrays laid out as in the module docstring."""
        seed = check_int(seed, "seed", 0, "use a non-negative seed")
        step = check_int(step, "step", 0, "steps count from 0")
        batch_size = check_int(batch_size, "batch_size", 1, "use at least one row")
        seq_len = check_int(seq_len, "seq_len", 1, "use a positive sequence length")
        if seq_len < self.min_seq_len:
            raise ValueError(f"seq_len={seq_len} is too short for task {self.name!r} with {self.options()}: "
                             f"it needs seq_len >= {self.min_seq_len}; raise seq_len or shrink the task options")
        tokens = np.full((batch_size, seq_len + 1), self.pad_id, np.int32)
        graded = np.zeros((batch_size, seq_len + 1), bool)
        real = np.zeros((batch_size, seq_len + 1), bool)
        for b in range(batch_size):
            sequence, sequence_graded = self.row(row_rng(seed, step, b), seq_len)
            n = len(sequence)
            tokens[b, :n], graded[b, :n], real[b, :n] = sequence, sequence_graded, True
        return {
            "inputs": tokens[:, :-1].copy(),
            "targets": tokens[:, 1:].copy(),
            "loss_mask": graded[:, 1:].astype(np.float32),
            "segment_ids": real[:, :-1].astype(np.int32),
        }

    def accuracy(self, predictions, batch: dict) -> dict:
        return token_accuracy(predictions, batch)

    def options(self) -> dict:
        return dataclasses.asdict(self)
