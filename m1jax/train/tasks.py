"""Built-in research tasks that need no download: mqar, copy, arith.

Each task makes (B, T) batches that depend only on (seed, step, row, seq_len): row b of step s is drawn from
its own generator seeded by (seed, step, b), so any batch can be rebuilt without replaying the ones before it.
A row is one token sequence S of length <= T + 1, padded to T + 1; then

    inputs      (B, T) int32    S[:-1]
    targets     (B, T) int32    S[1:]  (the next tokens)
    loss_mask   (B, T) float32  1 where the target is graded
    segment_ids (B, T) int32    1 for real input tokens, 0 for padding

- mqar (multi-query associative recall, as in Zoology, arXiv 2312.04927): key-value pairs, then queries of some
  keys; the target after each query key is its value. A fixed-size recurrent state (pure linear attention) fails
  it as the pairs outgrow the state; softmax attention and hybrids solve it: the canonical hybrid ablation.
- copy: a random string, a separator, then the string again; graded on the copy.
- arith: byte-level text problems "123+4567=4690\n" packed into the row; graded on the answer and its newline.
"""
from __future__ import annotations

import abc
import dataclasses

import numpy as np

from m1jax.tokenizer import ByteTokenizer

PAD_ID = 0  # mqar and copy reserve id 0 for padding


def row_rng(seed: int, step: int, row: int) -> np.random.Generator:
    """The generator of one row: a pure function of (seed, step, row)."""
    return np.random.default_rng(np.random.SeedSequence([seed, step, row]))


def _check_int(value, name: str, minimum: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}; {fix}")
    return int(value)


def _graded(predictions, batch: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    predictions = np.asarray(predictions)
    targets = np.asarray(batch["targets"])
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions must have the targets' shape {targets.shape} (B, T) of token ids, got "
                         f"{predictions.shape}; take argmax over the vocab axis of the logits first")
    return predictions, targets, np.asarray(batch["loss_mask"]) > 0


def token_accuracy(predictions, batch: dict) -> dict:
    """Fraction of graded positions (loss_mask > 0) where the prediction equals the target."""
    predictions, targets, mask = _graded(predictions, batch)
    graded = int(mask.sum())
    correct = int(((predictions == targets) & mask).sum())
    accuracy = correct / graded if graded else float("nan")
    return {"accuracy": accuracy, "token_accuracy": accuracy, "graded_tokens": graded}


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
        seed = _check_int(seed, "seed", 0, "use a non-negative seed")
        step = _check_int(step, "step", 0, "steps count from 0")
        batch_size = _check_int(batch_size, "batch_size", 1, "use at least one row")
        seq_len = _check_int(seq_len, "seq_len", 1, "use a positive sequence length")
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


@dataclasses.dataclass(frozen=True)
class MQAR(Task):
    """Multi-query associative recall.

    Ids: 0 pad, keys 1 .. (vocab - 1) // 2, values the rest (disjoint vocabularies). A row is
    k_1 v_1 ... k_P v_P  q_1 a_1 ... q_Q a_Q: P pairs with distinct keys and random values, then Q distinct keys
    in random order, each followed by its value; the targets graded are the a_i (after each query key).
    By default every stored key is queried (num_queries = num_pairs) and num_pairs is as many as fit, at most the
    number of keys: min(keys, (seq_len + 1) // 4). "accuracy" is the fraction of queried values recalled.
    """

    num_pairs: int | None = None
    num_queries: int | None = None
    vocab: int = 256
    name = "mqar"

    def __post_init__(self):
        _check_int(self.vocab, "vocab", 3, "mqar needs a pad id, one key and one value")
        for field in ("num_pairs", "num_queries"):
            value = getattr(self, field)
            if value is not None:
                _check_int(value, field, 1, f"pass a positive {field} or None for the default")
                if value > self.num_keys:
                    raise ValueError(f"{field}={value} exceeds the {self.num_keys} distinct keys of vocab="
                                     f"{self.vocab}; raise vocab to at least {2 * value + 1} or lower {field}")
        if self.num_pairs is not None and self.num_queries is not None and self.num_queries > self.num_pairs:
            raise ValueError(f"num_queries={self.num_queries} exceeds num_pairs={self.num_pairs}; "
                             "only stored keys can be queried")

    @property
    def num_keys(self) -> int:
        return (self.vocab - 1) // 2

    @property
    def first_value_id(self) -> int:
        return 1 + self.num_keys

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def min_seq_len(self) -> int:
        pairs = self.num_pairs or self.num_queries or 1
        queries = self.num_queries or pairs
        return 2 * pairs + 2 * queries - 1

    def sizes(self, seq_len: int) -> tuple[int, int]:
        """(pairs, queries) used at this seq_len: 2 * (pairs + queries) tokens fit in seq_len + 1."""
        room = (seq_len + 1) // 2  # pairs + queries
        if self.num_pairs is not None:
            return self.num_pairs, self.num_queries or self.num_pairs
        if self.num_queries is not None:
            return min(self.num_keys, room - self.num_queries), self.num_queries
        pairs = min(self.num_keys, room // 2)
        return pairs, pairs

    def row(self, rng, seq_len):
        pairs, queries = self.sizes(seq_len)
        keys = rng.choice(np.arange(1, 1 + self.num_keys), size=pairs, replace=False)
        values = rng.integers(self.first_value_id, self.vocab, size=pairs)
        asked = rng.choice(pairs, size=queries, replace=False)
        context = np.stack([keys, values], axis=1).reshape(-1)
        question = np.stack([keys[asked], values[asked]], axis=1).reshape(-1)
        sequence = np.concatenate([context, question]).astype(np.int32)
        graded = np.zeros(len(sequence), bool)
        graded[2 * pairs + 1::2] = True
        return sequence, graded


@dataclasses.dataclass(frozen=True)
class Copy(Task):
    """Copy a random string: s_1 .. s_L  SEP  s_1 .. s_L, graded on the second copy.

    Ids: 0 pad, 1 separator, 2 .. vocab - 1 the string's tokens. length defaults to seq_len // 2.
    "accuracy" is the fraction of copied tokens right.
    """

    length: int | None = None
    vocab: int = 256
    name = "copy"
    sep_id = 1

    def __post_init__(self):
        _check_int(self.vocab, "vocab", 3, "copy needs a pad id, a separator and one token")
        if self.length is not None:
            _check_int(self.length, "length", 1, "pass a positive length or None for seq_len // 2")

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def min_seq_len(self) -> int:
        return 2 * (self.length or 1)

    def row(self, rng, seq_len):
        length = self.length or seq_len // 2
        string = rng.integers(self.sep_id + 1, self.vocab, size=length)
        sequence = np.concatenate([string, [self.sep_id], string]).astype(np.int32)
        graded = np.zeros(len(sequence), bool)
        graded[length + 1:] = True
        return sequence, graded


ARITH_OPS = ("+", "-", "*")
MAX_ARITH_DIGITS = 9  # products of two 9-digit numbers still fit int64


def _check_arith(digits, ops) -> tuple[int, tuple[str, ...]]:
    _check_int(digits, "digits", 1, "operands need at least one digit")
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
        parts, spans, used = [], [], 0
        for i, a, b in zip(op_index.tolist(), first.tolist(), second.tolist()):
            prompt = f"{a}{self.ops[i]}{b}="
            text = prompt + str(_apply(a, self.ops[i], b)) + "\n"
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

    def accuracy(self, predictions, batch: dict) -> dict:
        metrics = token_accuracy(predictions, batch)
        predictions, targets, mask = _graded(predictions, batch)
        starts = mask & ~np.pad(mask, ((0, 0), (1, 0)))[:, :-1]  # first graded position of each problem
        problem_of = np.cumsum(starts.reshape(-1)) - 1
        wrong = (predictions != targets).reshape(-1) & mask.reshape(-1)
        num_problems = int(starts.sum())
        wrong_per_problem = np.bincount(problem_of[mask.reshape(-1)], weights=wrong[mask.reshape(-1)],
                                        minlength=num_problems)
        solved = int((wrong_per_problem == 0).sum())
        metrics["accuracy"] = solved / num_problems if num_problems else float("nan")
        metrics["problems"] = num_problems
        return metrics


TASKS = {"mqar": MQAR, "copy": Copy, "arith": Arith}


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
