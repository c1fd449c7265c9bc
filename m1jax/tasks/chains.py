"""Long addition with its carries written out: a reasoning chain of 40-200 bytes with an exactly checkable answer.

A problem "a+b=" is solved digit by digit from the least significant end, one step per digit position i
(x_i, y_i the digits of a and b, 0 past a number's length; c_i the carry into position i, c_0 = 0):

    "x_i+y_i=s_i"     when c_i = 0        s_i = x_i + y_i + c_i written in full (one or two digits),
    "x_i+y_i+1=s_i"   when c_i = 1        c_{i+1} = 1 if s_i >= 10 else 0

steps joined by ",", then "#" and the sum, then a newline:

    "4837+956="  ->  "7+6=13,3+5+1=9,8+9=17,4+0+1=5#5793\\n"

The carry decision "+1" (or its absence) after each "x+y" is the chain's fork: one low-probability token there
derails every later step. The answer after "#" alone is graded (an outcome reward, as in zero-RL on math);
`chain_consistent` checks the steps themselves. Ids are `ByteTokenizer`'s (bytes; pad 256).

Pretraining rows (`Chains`): problems "a+b=<chain>\\n" packed into the row until the next would not fit, graded on
the chain and its newline; operands have min_digits..max_digits digits, each number's length drawn on its own.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from m1jax.tasks.base import Task, check_int, pack_problems, problem_accuracy
from m1jax.tokenizer import ByteTokenizer

MAX_CHAIN_DIGITS = 40
ANSWER_MARK = "#"


def chain_solution(a: int, b: int) -> str:
    """The worked chain of a + b without the prompt and the newline: chain_solution(37, 76) = "7+6=13,3+7+1=11#113"."""
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, int) or not isinstance(b, int) or a < 0 or b < 0:
        raise ValueError(f"a={a!r}, b={b!r}: pass non-negative Python ints")
    xs, ys = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        x = int(xs[i]) if i < len(xs) else 0
        y = int(ys[i]) if i < len(ys) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={total}")
        carry = int(total >= 10)
    return ",".join(steps) + ANSWER_MARK + str(a + b)


def _draw_number(rng: np.random.Generator, digits: int) -> int:
    """Uniform among the numbers of exactly `digits` digits (0..9 for one digit), as a Python int (no overflow)."""
    first = int(rng.integers(1 if digits > 1 else 0, 10))
    return int(str(first) + "".join(map(str, rng.integers(0, 10, size=digits - 1))))


def chain_problem(rng: np.random.Generator, min_digits: int, max_digits: int) -> dict:
    """One problem {"prompt": "a+b=", "answer": "a+b", "solution": chain}; each operand's digit count is uniform in
    min_digits..max_digits, its value uniform among numbers of that many digits."""
    a, b = (_draw_number(rng, int(n)) for n in rng.integers(min_digits, max_digits + 1, size=2))
    return {"prompt": f"{a}+{b}=", "answer": str(a + b), "solution": chain_solution(a, b)}


def chain_answer(completion: str) -> str | None:
    """The answer of a completion: the text after the last "#" of its first line, stripped; None without a "#"."""
    line = completion.split("\n", 1)[0]
    if ANSWER_MARK not in line:
        return None
    return line.rsplit(ANSWER_MARK, 1)[1].strip()


def score_chain(completion: str, answer: str) -> bool:
    """True when the completion's final answer (after "#") is exactly `answer`."""
    return chain_answer(completion) == str(answer).strip()


_PROMPT = re.compile(r"^(\d+)\+(\d+)=$")


def chain_consistent(completion: str, prompt: str) -> bool:
    """True when the completion's first line is exactly the worked chain of the prompt "a+b=" (every step right)."""
    match = _PROMPT.match(prompt)
    if match is None:
        raise ValueError(f"prompt={prompt!r}: expected 'a+b=' with decimal a and b")
    return completion.split("\n", 1)[0] == chain_solution(int(match[1]), int(match[2]))


def max_chain_len(max_digits: int) -> int:
    """Bytes of the longest chain and its newline: max_digits steps "9+9+1=19" and commas, "#", the sum."""
    return 8 * max_digits + (max_digits - 1) + 1 + (max_digits + 1) + 1


def _check_digits(min_digits, max_digits) -> None:
    check_int(min_digits, "min_digits", 1, "operands need at least one digit")
    check_int(max_digits, "max_digits", 1, "operands need at least one digit")
    if min_digits > max_digits:
        raise ValueError(f"min_digits={min_digits} > max_digits={max_digits}; pass min_digits <= max_digits")
    if max_digits > MAX_CHAIN_DIGITS:
        raise ValueError(f"max_digits={max_digits} exceeds {MAX_CHAIN_DIGITS}; lower max_digits")


@dataclasses.dataclass(frozen=True)
class Chains(Task):
    """Pretraining rows of worked long additions (module docstring). "accuracy" is the fraction of problems whose
    whole chain (and newline) is predicted right under teacher forcing."""

    min_digits: int = 1
    max_digits: int = 8
    name = "chains"
    tokenizer = ByteTokenizer()
    pad_id = ByteTokenizer.pad_id

    def __post_init__(self):
        _check_digits(self.min_digits, self.max_digits)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def min_seq_len(self) -> int:
        return 2 * self.max_digits + 2 + max_chain_len(self.max_digits) - 1

    def row(self, rng, seq_len):
        problems = iter(lambda: chain_problem(rng, self.min_digits, self.max_digits), None)  # endless
        return pack_problems(((p["prompt"], p["solution"] + "\n") for p in problems), seq_len + 1)

    def accuracy(self, predictions, batch: dict) -> dict:
        return problem_accuracy(predictions, batch)
