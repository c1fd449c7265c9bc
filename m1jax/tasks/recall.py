"""Recall tasks: mqar and copy, over small integer vocabularies (id 0 is padding).

- mqar (multi-query associative recall, as in Zoology, arXiv 2312.04927): key-value pairs, then queries of some
  keys; the target after each query key is its value. A fixed-size recurrent state (pure linear attention) fails
  it as the pairs outgrow the state; softmax attention and hybrids solve it: the canonical hybrid ablation.
- copy: a random string, a separator, then the string again; graded on the copy.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from m1jax.tasks.base import Task, check_int


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
        check_int(self.vocab, "vocab", 3, "mqar needs a pad id, one key and one value")
        for field in ("num_pairs", "num_queries"):
            value = getattr(self, field)
            if value is not None:
                check_int(value, field, 1, f"pass a positive {field} or None for the default")
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
        check_int(self.vocab, "vocab", 3, "copy needs a pad id, a separator and one token")
        if self.length is not None:
            check_int(self.length, "length", 1, "pass a positive length or None for seq_len // 2")

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
