"""Building blocks of the synthetic long-context tasks: pseudo-words, filler text, fitting text to a token budget.

Everything is drawn from a numpy Generator, so an item is a pure function of (seed, task, length, index) and a
resumed run regenerates exactly the items it skipped. Lengths are in tokens of the model's own tokenizer.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
# Neutral filler, in the spirit of RULER's repeated "noise" haystack: facts that never answer a question.
FILLER = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
    "The river runs past the old mill.", "A light wind moves the tall reeds.", "The road bends to the left.",
    "Clouds gather slowly over the hills.", "The market opens early on most days.",
)


def pseudo_word(rng: np.random.Generator, syllables: int = 3) -> str:
    """A pronounceable non-word such as 'dakoru' (no real-word meaning to lean on)."""
    return "".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
                   for _ in range(syllables))


def distinct_words(rng: np.random.Generator, count: int, syllables: int = 3) -> list[str]:
    """`count` distinct pseudo-words."""
    if count > len(_CONSONANTS) ** syllables * len(_VOWELS) ** syllables // 4:
        raise ValueError(f"cannot draw {count} distinct {syllables}-syllable words; use more syllables")
    words: dict[str, None] = {}
    while len(words) < count:
        words[pseudo_word(rng, syllables)] = None
    return list(words)


def number(rng: np.random.Generator, digits: int = 7) -> str:
    return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


class TokenCounter:
    """Token counts of text pieces, cached per distinct piece (the filler repeats, so this stays cheap at 1M)."""

    def __init__(self, encode: Callable[[str], list[int]]):
        self.encode = encode
        self._cache: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        n = self._cache.get(text)
        if n is None:
            n = len(self.encode(text))
            if len(text) < 2000:
                self._cache[text] = n
        return n


def filler_sentences(rng: np.random.Generator, budget: int, count: TokenCounter) -> list[str]:
    """Filler sentences whose token counts (each with its trailing space) add up to at most `budget`."""
    out, used = [], 0
    cheapest = min(count(s + " ") for s in FILLER)
    while budget - used >= cheapest:
        sentence = FILLER[rng.integers(len(FILLER))]
        n = count(sentence + " ")
        if used + n <= budget:
            out.append(sentence)
            used += n
    return out


def insert_at_depths(rng: np.random.Generator, sentences: list[str], inserts: Sequence[str],
                     ordered: bool = False) -> list[str]:
    """Sentences with each insert placed at a uniformly drawn depth (kept in the given order when ordered)."""
    positions = np.sort(rng.integers(0, len(sentences) + 1, size=len(inserts)))
    if not ordered:
        positions = rng.permutation(positions)
    out = list(sentences)
    for offset, (position, text) in enumerate(sorted(zip(positions, range(len(inserts))))):
        out.insert(int(position) + offset, inserts[text])
    return out
