"""Arithmetic: byte-level text problems "123+4567=4690\\n", for pretraining (packed rows) and RL (prompt, answer).

A problem draws its operator uniformly from `ops`, each operand's digit count uniformly in 1..digits and then its
value uniformly among numbers of that many digits; the answer is exact integer arithmetic (int64 holds every
product of two 9-digit operands, hence MAX_ARITH_DIGITS).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from m1jax.tasks.base import Task, check_int, pack_problems, problem_accuracy
from m1jax.tokenizer import ByteTokenizer

ARITH_OPS = ("+", "-", "*")
MAX_ARITH_DIGITS = 9  # products of two 9-digit numbers still fit int64


def _check_arith(digits, ops) -> tuple[int, tuple[str, ...]]:
    check_int(digits, "digits", 1, "operands need at least one digit")
    if digits > MAX_ARITH_DIGITS:
        raise ValueError(f"digits={digits} exceeds {MAX_ARITH_DIGITS} (int64 products); lower digits")
    ops = tuple(ops)
    if not ops or any(op not in ARITH_OPS for op in ops) or len(set(ops)) != len(ops):
        raise ValueError(f"ops must be distinct operators from {ARITH_OPS}, e.g. '+-' or ('+', '*'), got {ops!r}")
    return digits, ops


def _draw_operands(rng: np.random.Generator, n: int, digits: int, ops: tuple[str, ...]):
    """n problems: operand digit counts uniform in 1..digits, then values uniform among that many digits."""
    op_index = rng.integers(0, len(ops), size=n)
    widths = rng.integers(1, digits + 1, size=(2, n))
    low = np.where(widths == 1, 0, 10 ** (widths - 1))
    values = rng.integers(low, 10 ** widths)
    return op_index, values[0], values[1]


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def arith_problem(rng: np.random.Generator, digits: int = 4, ops="+-") -> tuple[str, str]:
    """One problem: (prompt "123+4567=", answer "4690"). The answer is exact integer arithmetic."""
    digits, ops = _check_arith(digits, ops)
    op_index, a, b = _draw_operands(rng, 1, digits, ops)
    op = ops[int(op_index[0])]
    a, b = int(a[0]), int(b[0])
    return f"{a}{op}{b}=", str(_apply(a, op, b))


def score_arith(completion_text: str, answer: str) -> bool:
    """True when the completion's first line, stripped of whitespace, is exactly the answer."""
    return completion_text.split("\n", 1)[0].strip() == str(answer).strip()


@dataclasses.dataclass(frozen=True)
class Arith(Task):
    """Multi-digit arithmetic as byte-level text, problems "a<op>b=c\\n" packed into each row until the next
    one would not fit (the rest is padding). Ids are `ByteTokenizer`'s (vocab_size 260; pad 256).
    Graded: the answer characters and the newline after them. "accuracy" is the fraction of problems whose
    whole answer (and newline) is right; a problem is a maximal run of graded positions.
    """

    digits: int = 4
    ops: tuple[str, ...] | str = ("+", "-")
    name = "arith"
    tokenizer = ByteTokenizer()
    pad_id = ByteTokenizer.pad_id

    def __post_init__(self):
        _check_arith(self.digits, self.ops)
        object.__setattr__(self, "ops", tuple(self.ops))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def max_answer_len(self) -> int:
        return max(2 * self.digits if op == "*" else self.digits + 1 for op in self.ops)

    @property
    def min_seq_len(self) -> int:
        longest_problem = 2 * self.digits + 2 + self.max_answer_len + 1
        return longest_problem - 1

    def row(self, rng, seq_len):
        room = seq_len + 1
        op_index, first, second = _draw_operands(rng, room // 6 + 1, self.digits, self.ops)  # >= 6 bytes each
        problems = ((f"{a}{self.ops[i]}{b}=", f"{_apply(a, self.ops[i], b)}\n")
                    for i, a, b in zip(op_index.tolist(), first.tolist(), second.tolist()))
        return pack_problems(problems, room)

    def accuracy(self, predictions, batch: dict) -> dict:
        return problem_accuracy(predictions, batch)
