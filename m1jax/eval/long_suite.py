"""Long context, built in: RULER-style synthetic retrieval and aggregation, and an MRCR-style multi-round task.

Tasks (after RULER, Hsieh et al. 2024, arXiv 2404.06654, and OpenAI-MRCR), each generated at every requested
length (prompt tokens of the model's tokenizer) from a seed, no data file:

    niah_single     one "special magic number" for a key hidden in filler; recall it
    niah_multikey   four keys with numbers; recall the one asked for (three distractor needles)
    niah_multivalue one key with four numbers; recall all four
    vt              variable tracking: VAR A = 12345, VAR B = VAR A, ... (plus a distractor chain); name every
                    variable holding the value
    cwe             common-word extraction: a numbered list where ten words repeat more often than the rest; name
                    the ten
    mrcr            a long chat of "write a <form> about <topic>" turns in which one request repeats 2-4 times;
                    "prepend <code> to the n-th <form> about <topic>"

Scores: the RULER tasks score the fraction of expected strings found in the completion (case-insensitive), so a
single-needle item scores 0 or 1 and a four-value one 0, 0.25, ... 1. MRCR scores as OpenAI's grader does: 0
unless the reply starts with the code, else difflib's SequenceMatcher ratio between the rest and the n-th
response. A leading reasoning block (<think>...</think>) is removed before scoring. Results: mean score per task
and length, and per length over tasks.
"""
from __future__ import annotations

import difflib
import re
from typing import Any, Callable, Sequence

import numpy as np

from m1jax.eval.long_context import (TokenCounter, distinct_words, filler_sentences, insert_at_depths, number,
                                     pseudo_word)

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe", "mrcr")
DEFAULT_LENGTHS = (1024, 2048, 4096)
DEFAULT_MAX_NEW_TOKENS = 128
MIN_LENGTH = 1024
MESSAGE_OVERHEAD = 8  # tokens a chat template may add per message (role tags); the true count is recorded
_ORDINALS = {1: "1st", 2: "2nd", 3: "3rd", 4: "4th"}
_FORMS = ("poem", "riddle", "story", "essay", "song", "letter")

NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the numbers afterwards.\n")


def strip_reasoning(completion: str) -> str:
    """The completion after its last </think> (the whole completion when it has none)."""
    return completion.rsplit("</think>", 1)[-1].strip()


def parse_length(text: str) -> int:
    """'4096', '4K', '128k', '1M' -> tokens (K = 1024, M = 1024 * 1024)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", str(text))
    if not match:
        raise ValueError(f"length {text!r} is not a token count; write e.g. 4096, 4K or 1M")
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[match.group(2).lower()]


# ------------------------------------------------------------------------------------------------ generators
def _haystack(rng, budget: int, count: TokenCounter, needles: Sequence[str], ordered: bool = False) -> str:
    room = budget - sum(count(n + " ") for n in needles)
    if room < 0:
        raise ValueError("the needles alone exceed the length; ask for longer --lengths")
    return " ".join(insert_at_depths(rng, filler_sentences(rng, room, count), needles, ordered))


def _niah(rng, budget, count, keys: int, values: int) -> tuple[list[dict], list[str]]:
    names = distinct_words(rng, keys)
    numbers = [[number(rng) for _ in range(values)] for _ in names]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, vs in zip(names, numbers) for v in vs]
    key = int(rng.integers(keys))
    what = "numbers" if values > 1 else "number"
    question = (f"What {'are all the' if values > 1 else 'is the'} special magic {what} for {names[key]} "
                "mentioned in the provided text?")
    fixed = count(NIAH_INTRO) + count("\n" + question) + MESSAGE_OVERHEAD
    context = _haystack(rng, budget - fixed, count, needles)
    return [{"role": "user", "content": f"{NIAH_INTRO}{context}\n{question}"}], numbers[key]


def _niah_single(rng, budget, count):
    return _niah(rng, budget, count, keys=1, values=1)


def _niah_multikey(rng, budget, count):
    return _niah(rng, budget, count, keys=4, values=1)


def _niah_multivalue(rng, budget, count):
    return _niah(rng, budget, count, keys=1, values=4)


def _variable_tracking(rng, budget, count, hops: int = 4, chains: int = 2):
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    names: list[str] = []
    while len(names) < (hops + 1) * chains:
        name = "".join(rng.choice(letters, 5))
        if name not in names:
            names.append(name)
    values = [number(rng, 5) for _ in range(chains)]
    while len(set(values)) < chains:
        values = [number(rng, 5) for _ in range(chains)]
    statements = []
    for c in range(chains):
        chain = names[c * (hops + 1):(c + 1) * (hops + 1)]
        statements.append([f"VAR {chain[0]} = {values[c]}."] + [f"VAR {b} = VAR {a}." for a, b in
                                                                zip(chain, chain[1:])])
    question = f"Question: Find all variables that are assigned the value {values[0]} in the text above."
    intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
    fixed = count(intro) + count("\n" + question) + MESSAGE_OVERHEAD
    room = budget - fixed - sum(count(s + " ") for chain in statements for s in chain)
    if room < 0:
        raise ValueError("the variable chains alone exceed the length; ask for longer --lengths")
    sentences = filler_sentences(rng, room, count)
    for chain in statements:
        sentences = insert_at_depths(rng, sentences, chain, ordered=True)
    return [{"role": "user", "content": f"{intro}{' '.join(sentences)}\n{question}"}], names[:hops + 1]


def _common_words(rng, budget, count, num_common: int = 10):
    intro = "Below is a numbered list of words. In these words, some appear more often than others.\n"
    question = (f"Question: What are the {num_common} most common words in the above list? "
                f"Answer: The top {num_common} words that appear most often in the list are:")
    room = budget - count(intro) - count("\n" + question) - MESSAGE_OVERHEAD
    entries = room // count("100. dakoru ")
    entries = room // count(f"{max(entries // 2, 1)}. dakoru ")  # entries numbered up to `entries`: mid width
    freq_common = int(np.clip(0.3 * entries / num_common, 2, 30))
    if entries < num_common * freq_common + 1:
        raise ValueError(f"the length leaves room for only {max(entries, 0)} list entries; common-word extraction "
                         "needs more: ask for longer --lengths")
    freq_rare = max(1, min(3, freq_common - 1))
    num_rare = (entries - num_common * freq_common) // freq_rare
    words = distinct_words(rng, num_common + num_rare, syllables=3 if num_common + num_rare < 20_000 else 4)
    common, rare = words[:num_common], words[num_common:]
    while True:
        listing = rng.permutation(common * freq_common + rare * freq_rare)
        text = " ".join(f"{i + 1}. {w}" for i, w in enumerate(listing))
        if count(text) <= room or len(rare) <= 1:
            break
        rare = rare[:int(len(rare) * 0.98)]  # the per-entry estimate was low: fewer rare words, same counts
    if count(text) > room:
        raise ValueError("common-word extraction does not fit this length; ask for longer --lengths")
    return [{"role": "user", "content": f"{intro}{text}\n{question}"}], common


def _response(rng) -> str:
    return " ".join(" ".join(pseudo_word(rng, int(rng.integers(1, 4))) for _ in range(int(rng.integers(4, 8))))
                    .capitalize() + "." for _ in range(int(rng.integers(2, 4))))


def _mrcr(rng, budget, count, measure=None):
    """A multi-round chat; returns (messages, [code, target response]). measure(messages) -> prompt tokens as the
    model sees them (rendered); rounds other than the repeated request are dropped until it fits the budget."""
    topics = distinct_words(rng, 64)
    form, topic = _FORMS[rng.integers(len(_FORMS))], topics[0]
    repeats = int(rng.integers(2, 5))
    nth = int(rng.integers(1, repeats + 1))
    code = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz0123456789"), 10))
    final = {"role": "user", "content": f"Prepend {code} to the {_ORDINALS[nth]} (1 indexed) {form} about "
                                        f"{topic}. Do not include any other text in your response."}
    turn = lambda ask, reply: [{"role": "user", "content": ask}, {"role": "assistant", "content": reply}]
    cost = lambda msgs: sum(count(m["content"]) + MESSAGE_OVERHEAD for m in msgs)
    needles = [turn(f"Write a {form} about {topic}.", _response(rng)) for _ in range(repeats)]
    room = budget - cost([final]) - sum(cost(t) for t in needles)
    others = []
    while room > 0:
        other_form, other_topic = _FORMS[rng.integers(len(_FORMS))], topics[int(rng.integers(1, len(topics)))]
        candidate = turn(f"Write a {other_form} about {other_topic}.", _response(rng))
        if cost(candidate) > room:
            break
        room -= cost(candidate)
        others.append(candidate)
    is_needle = np.zeros(len(others) + repeats, bool)
    is_needle[rng.choice(len(is_needle), size=repeats, replace=False)] = True
    others_iter, needles_iter = iter(others), iter(needles)
    rounds = [(flag, next(needles_iter) if flag else next(others_iter)) for flag in is_needle]
    flatten = lambda: [m for _, r in rounds for m in r] + [final]
    measure = measure or cost
    while (excess := measure(flatten()) - budget) > 0:  # the estimate was low: drop the oldest other rounds
        drop = [i for i, (flag, _) in enumerate(rounds) if not flag]
        if not drop:
            raise ValueError("the repeated requests alone exceed the length; ask for longer --lengths")
        per_round = max(1, cost(rounds[drop[0]][1]))
        gone = set(drop[:-(-excess // per_round)])
        rounds = [r for i, r in enumerate(rounds) if i not in gone]
    return flatten(), [code, needles[nth - 1][1]["content"]]


GENERATORS: dict[str, Callable] = {"niah_single": _niah_single, "niah_multikey": _niah_multikey,
                                   "niah_multivalue": _niah_multivalue, "vt": _variable_tracking,
                                   "cwe": _common_words, "mrcr": _mrcr}


# ------------------------------------------------------------------------------------------------ scoring
def score_contains_all(completion: str, answers: Sequence[str]) -> float:
    """Fraction of answers found in the completion (case-insensitive) after its reasoning block."""
    text = strip_reasoning(completion).lower()
    return float(np.mean([a.lower() in text for a in answers]))


def score_mrcr(completion: str, code: str, target: str) -> float:
    """0 unless the reply starts with the code; else SequenceMatcher ratio of the rest against the target."""
    reply = strip_reasoning(completion)
    if not reply.startswith(code):
        return 0.0
    return difflib.SequenceMatcher(None, reply[len(code):].strip(), target.strip()).ratio()


class LongSuite:
    name = "long"
    required = ()
    default_max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    use_chat = True

    def __init__(self, encode: Callable[[str], list[int]], *, lengths: Sequence[int] = DEFAULT_LENGTHS,
                 tasks: Sequence[str] = TASKS, items_per_length: int = 4, seed: int = 0,
                 render: Callable[[Sequence[dict]], str] | None = None):
        """encode: the model's tokenizer (text -> ids); render: messages -> prompt text as the model will see it
        (the chat template or m1jax.eval.prompts.plain_prompt, the default), used to fit MRCR to each length."""
        unknown = [t for t in tasks if t not in GENERATORS]
        if unknown:
            raise ValueError(f"unknown long-context task(s) {unknown}; choose from {list(TASKS)}")
        short = [n for n in lengths if n < MIN_LENGTH]
        if short:
            raise ValueError(f"--lengths {short} are below {MIN_LENGTH} tokens; the tasks need room for filler")
        if items_per_length < 1:
            raise ValueError(f"items_per_length={items_per_length}: pass at least 1 (--limit)")
        self.count, self.lengths, self.tasks = TokenCounter(encode), sorted(set(lengths)), list(tasks)
        self.items_per_length, self.seed = items_per_length, seed
        if render is None:
            from m1jax.eval.prompts import plain_prompt as render
        self.measure = lambda messages: len(encode(render(messages)))

    def make_item(self, task: str, length: int, index: int) -> dict[str, Any]:
        extra = (self.measure,) if task == "mrcr" else ()
        budget = length
        for _ in range(8):  # the rendered prompt (template tokens, merges across pieces) may overshoot: shrink
            rng = np.random.default_rng([self.seed, TASKS.index(task), length, index])
            messages, answers = GENERATORS[task](rng, budget, self.count, *extra)
            excess = self.measure(messages) - length
            if excess <= 0:
                break
            budget -= excess + 1 + length // 256
        else:
            raise ValueError(f"could not fit {task} into {length} tokens; ask for longer --lengths")
        return {"id": f"{task}/{length}/{index}", "task": task, "length": length, "messages": messages,
                "answers": answers}

    def items(self) -> list[dict[str, Any]]:
        return [self.make_item(task, length, i) for length in self.lengths for task in self.tasks
                for i in range(self.items_per_length)]

    def score(self, item: dict[str, Any], completion: str) -> dict[str, Any]:
        if item["task"] == "mrcr":
            return {"score": score_mrcr(completion, *item["answers"])}
        return {"score": score_contains_all(completion, item["answers"])}

    def summarize(self, records: Sequence[dict[str, Any]], samples: int) -> dict[str, Any]:
        table: dict[str, dict[str, list[float]]] = {}
        for record in records:
            task, length, _ = record["id"].split("/")
            table.setdefault(task, {}).setdefault(length, []).append(record["score"])
        scores = {task: {length: float(np.mean(v)) for length, v in by_length.items()}
                  for task, by_length in table.items()}
        lengths = sorted({length for by_length in scores.values() for length in by_length}, key=int)
        by_length = {length: float(np.mean([scores[t][length] for t in scores if length in scores[t]]))
                     for length in lengths}
        return {"items_per_length": self.items_per_length, "samples_per_item": samples, "scores": scores,
                "by_length": by_length, "mean": float(np.mean(list(by_length.values()))) if by_length else None}

    def table(self, summary: dict[str, Any]) -> str:
        lengths = list(summary["by_length"])
        head = "| task | " + " | ".join(_label(int(n)) for n in lengths) + " |\n"
        head += "|---|" + "---|" * len(lengths) + "\n"
        rows = "".join(f"| {task} | " + " | ".join(f"{100 * by[n]:.1f}" if n in by else "-" for n in lengths)
                       + " |\n" for task, by in summary["scores"].items())
        mean = "| **mean** | " + " | ".join(f"{100 * summary['by_length'][n]:.1f}" for n in lengths) + " |\n"
        return head + rows + mean + (f"\nscores in %, {summary['items_per_length']} items per task and length x "
                                     f"{summary['samples_per_item']} samples\n")


def _label(n: int) -> str:
    if n % 1024 ** 2 == 0:
        return f"{n // 1024 ** 2}M"
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)
