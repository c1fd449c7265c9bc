"""Countdown with search traces (Stream-of-Search, Gandhi et al. 2024): a task whose responses branch.

Rules: reach the target from `count` numbers with + - * /, using every number exactly once (Stream-of-Search's
Countdown). A step combines two numbers of the current multiset into one; every result must be a positive integer
(a - b needs a > b, a / b needs b to divide a). Problems are solvable by construction (the target is the end of a
random sequence of steps) and `solvable` checks them exhaustively.

The supervised response is the trace of a randomized heuristic depth-first search, on one line, items split by " ":

    "a+b=c[s]"   an attempted step (larger operand first) and the multiset s it leaves: the untouched numbers in
                 order, then c; the search moves to s
    "a+b=cx"     a last step (two numbers left) whose result is not the target: a dead end
    "<"          the node entered last failed (its children were tried or its breadth spent): back to its parent
    "#path"      the found path, its steps joined by ","; "#fail" when the search gave up (length budget or root
                 exhausted)

    "20,2,9,2>58:" -> "20+9=29[2,2,29] 29*2=58[2,58] 58+2=60x 58-2=56x < 29+2=31[2,31] 31*2=62x 31+2=33x < <
                       20*2=40[9,2,40] 9*2=18[40,18] 40+18=58 #20*2=40,9*2=18,40+18=58\\n"   (one line, 150 bytes)

A node's children are tried in a random order biased by a heuristic (how close the nearest result of one more
step comes to the target; Gumbel keys at `temperature`), at most `breadth` of them below the root: so traces take
wrong branches and back out. Those choices are the forks: the first byte of each attempted step (which numbers to
combine; the operator after it chooses too) and "<" (give up a branch); `token_roles` labels them. The search
stops with "#fail" before the trace would pass `max_len` bytes (its newline included); pretraining rows hold only
the traces that found a path unless `keep_failed`. The reward verifies the final path only (`check_path`: steps,
numbers from the multiset, every number used, target reached); the trace is never trusted. Ids are
`ByteTokenizer`'s (bytes; pad 256).
"""
from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from m1jax.tasks.base import Task, check_int, pack_problems, problem_accuracy, row_rng
from m1jax.tokenizer import ByteTokenizer

OPS = "+-*/"
ANSWER_MARK, DEAD_END, BACK, FAIL = "#", "x", "<", "fail"
MIN_COUNT, MAX_COUNT = 3, 5
MAX_DRAWS = 1000  # draws of numbers and path before a problem with a target in range is declared impossible
_STEP = r"(\d+)([-+*/])(\d+)=(\d+)"
_PROMPT = re.compile(r"^(\d+(?:,\d+)*)>(\d+):$")


# ------------------------------------------------------------------------------------------------ rules
def apply(a: int, op: str, b: int) -> int | None:
    """a op b when the result is a positive integer (the rules), else None."""
    if op == "+":
        return a + b
    if op == "*":
        return a * b
    if op == "-":
        return a - b if a > b else None
    return a // b if b > 0 and a % b == 0 else None


def moves(state: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """Every step from `state` as (text "a op b=c", next state: the other numbers in order, then c), larger operand
    first; a step that leaves the same multiset as an earlier one is skipped."""
    out, seen = [], set()
    for i in range(len(state)):
        for j in range(i + 1, len(state)):
            a, b = max(state[i], state[j]), min(state[i], state[j])
            rest = tuple(x for k, x in enumerate(state) if k not in (i, j))
            for op in OPS:
                c = apply(a, op, b)
                key = None if c is None else tuple(sorted(rest + (c,)))
                if key is not None and key not in seen:
                    seen.add(key)
                    out.append((f"{a}{op}{b}={c}", rest + (c,)))
    return out


def solvable(numbers, target: int) -> bool:
    """Exhaustive: whether some order of steps turns all of `numbers` into exactly [target]."""
    state = tuple(int(x) for x in numbers)
    if len(state) == 1:
        return state[0] == target
    return any(solvable(nxt, target) for _, nxt in moves(state))


def format_prompt(numbers, target: int) -> str:
    return ",".join(map(str, numbers)) + f">{target}:"


def parse_prompt(prompt: str) -> tuple[tuple[int, ...], int]:
    """"20,2,9,2>58:" -> ((20, 2, 9, 2), 58); ValueError for anything else."""
    match = _PROMPT.match(str(prompt))
    if match is None:
        raise ValueError(f"prompt={prompt!r}: expected a countdown prompt like '20,2,9,2>58:'")
    return tuple(int(x) for x in match[1].split(",")), int(match[2])


# ------------------------------------------------------------------------------------------------ the search
class _OutOfRoom(Exception):
    pass


def heuristic(state: tuple[int, ...], target: int) -> int:
    """How far the state looks from the target: |x - target| for the nearest result x of one more step (the final
    number itself once one is left); 0 on a two-number state means the target is one step away."""
    if len(state) == 1:
        return abs(state[0] - target)
    best = abs(state[0] + state[1] - target)
    for i, x in enumerate(state):  # every pair's results, without building the states (the search's hot loop)
        for y in state[i + 1:]:
            a, b = max(x, y), min(x, y)
            best = min(best, abs(a + b - target), abs(a * b - target), abs(a - b - target) if a > b else best,
                       abs(a // b - target) if a % b == 0 else best)
    return best


def search_trace(numbers, target: int, rng: np.random.Generator, breadth: int = 2, temperature: float = 0.1,
                 max_len: int = 512) -> tuple[str, bool]:
    """(trace without its newline, whether it found a path): the randomized DFS of the module docstring."""
    items, length = [], [0]  # the trace is " ".join(items); length[0] its bytes

    def push(item: str) -> None:  # room is kept for " #fail" and the newline after every item
        if length[0] + len(item) + 1 + len(ANSWER_MARK + FAIL) + 2 > max_len:
            raise _OutOfRoom
        length[0] += len(item) + (1 if items else 0)
        items.append(item)

    def ordered(children):
        h = np.array([heuristic(nxt, target) for _, nxt in children], np.float64)
        gumbel = rng.gumbel(size=len(children))
        keys = -h / (temperature * max(target, 1)) + gumbel if temperature > 0 else -h + 1e-9 * gumbel
        return [children[i] for i in np.argsort(-keys, kind="stable")]

    def dfs(state, path) -> bool:
        children = ordered(moves(state))
        for text, nxt in children if not path else children[:breadth]:
            if len(nxt) > 1:
                push(f"{text}[{','.join(map(str, nxt))}]")
                if dfs(nxt, path + [text]):
                    return True
                push(BACK)
            elif nxt[0] != target:
                push(text + DEAD_END)
            else:
                answer = ANSWER_MARK + ",".join(path + [text])
                if length[0] + len(text) + len(answer) + 3 > max_len:
                    raise _OutOfRoom
                items.extend([text, answer])
                return True
        return False

    try:
        found = dfs(tuple(int(x) for x in numbers), [])
    except _OutOfRoom:
        found = False
    if not found:
        items.append(ANSWER_MARK + FAIL)
    return " ".join(items), found


def countdown_problem(rng: np.random.Generator, count: int = 4, max_number: int = 20, min_target: int = 10,
                      max_target: int = 100, breadth: int = 2, temperature: float = 0.1, max_len: int = 512) -> dict:
    """{"prompt", "numbers", "target", "solution" (trace, no newline), "solved", "answer" (its path or "")}: numbers
    uniform in 1..max_number, the target the end of random steps over them, redrawn until in min..max_target."""
    for _ in range(MAX_DRAWS):
        numbers = tuple(int(x) for x in rng.integers(1, max_number + 1, size=count))
        state = numbers
        while len(state) > 1:
            options = moves(state)
            state = options[int(rng.integers(len(options)))][1]
        if min_target <= state[0] <= max_target:
            break
    else:
        raise ValueError(f"no target in {min_target}..{max_target} after {MAX_DRAWS} draws of {count} numbers in "
                         f"1..{max_number}; widen min_target..max_target")
    trace, solved = search_trace(numbers, state[0], rng, breadth, temperature, max_len)
    return {"prompt": format_prompt(numbers, state[0]), "numbers": numbers, "target": state[0], "solution": trace,
            "solved": solved, "answer": trace.rsplit(ANSWER_MARK, 1)[1] if solved else ""}


# ------------------------------------------------------------------------------------------------ checking
def countdown_answer(completion: str) -> str | None:
    """The path of a completion: the text after the last "#" of its first line, stripped; None without a "#"."""
    line = completion.split("\n", 1)[0]
    return line.rsplit(ANSWER_MARK, 1)[1].strip() if ANSWER_MARK in line else None


def check_path(path: str | None, numbers, target: int) -> bool:
    """Whether `path` "a op b=c,..." is a solution: each step's operands taken from the multiset (the numbers, then
    the results so far), its arithmetic right under the rules, and the multiset ends as exactly [target]."""
    if path is None or not re.fullmatch(f"{_STEP}(,{_STEP})*", path):
        return False
    pool = collections.Counter(int(x) for x in numbers)
    for a, op, b, c in re.findall(_STEP, path):
        if any(x != str(int(x)) for x in (a, b, c)):  # no leading zeros: one spelling per number
            return False
        a, b, c = int(a), int(b), int(c)
        pool[a] -= 1
        pool[b] -= 1
        if pool[a] < 0 or pool[b] < 0 or apply(a, op, b) != c:
            return False
        pool[c] += 1
    return +pool == collections.Counter([target])


def score_countdown(completion: str, prompt: str) -> bool:
    """True when the completion's final path solves the prompt's problem."""
    numbers, target = parse_prompt(prompt)
    return check_path(countdown_answer(completion), numbers, target)


def countdown_reward(completion: str, example: Mapping[str, Any]) -> float:
    """1.0 when the path after the completion's last "#" solves example["prompt"], else 0.0 (malformed included)."""
    return float(score_countdown(completion, example["prompt"]))


countdown_reward.check_example = lambda example: parse_prompt(example.get("prompt"))


def take(state: tuple[int, ...], a: int, op: str, b: int) -> tuple[int, ...] | None:
    """The state after step "a op b" (a and b removed where they first occur, the result appended), or None when
    the operands are not in `state` or the rules refuse the step."""
    rest = list(state)
    for x in (a, b):
        if x not in rest:
            return None
        rest.remove(x)
    c = apply(a, op, b)
    return None if c is None else tuple(rest) + (c,)


_ITEM = re.compile(r"(?P<a>\d+)(?P<op>[-+*/])(?P<b>\d+)=(?P<c>\d+)(?P<mark>x|\[[\d,]*\])?")


def trace_consistent(completion: str, prompt: str) -> bool:
    """Whether the completion's first line is a well-formed search trace of the prompt (module docstring): every
    step's operands in the state it is taken from, its result and the state it writes right, dead ends and backs
    where they belong, and a final path that is the steps to the last node (or "#fail")."""
    numbers, target = parse_prompt(prompt)
    *items, last = completion.split("\n", 1)[0].split(" ")
    stack = [(tuple(numbers), [])]  # (state, the steps that led to it)
    for i, item in enumerate(items):
        state, path = stack[-1]
        if item == BACK:
            if len(stack) == 1:
                return False
            stack.pop()
            continue
        match = _ITEM.fullmatch(item)
        nxt = None if match is None else take(state, int(match["a"]), match["op"], int(match["b"]))
        if nxt is None or str(nxt[-1]) != match["c"]:
            return False
        step, mark = item[:match.start("mark")] if match["mark"] else item, match["mark"]
        if len(nxt) > 1 and mark == f"[{','.join(map(str, nxt))}]":
            stack.append((nxt, path + [step]))
        elif len(nxt) == 1 and mark == (None if nxt[0] == target else DEAD_END):
            if mark is None and i != len(items) - 1:  # a found path ends the search
                return False
        else:
            return False
    tail = _ITEM.fullmatch(items[-1]) if items else None  # the last step, if the last item is one
    if last == ANSWER_MARK + FAIL:
        return tail is None or tail["mark"] is not None
    return tail is not None and tail["mark"] is None and last == ANSWER_MARK + ",".join(stack[-1][1] + [items[-1]])


# ------------------------------------------------------------------------------------------------ fork tokens
TOKEN_ROLES = ("step_fork", "back_fork", "operation", "result", "state", "dead_end", "separator", "answer")
FORK_ROLES = ("step_fork", "back_fork")


def trace_roles(text: str) -> np.ndarray:
    """(len(text),) index into TOKEN_ROLES of each character of a (possibly malformed) trace, read lexically:
    step_fork: the first byte of an attempted step (which numbers to combine); back_fork: "<" (give up a branch);
    operation: the rest of "a op b"; result: "=" and the digits after it; state: "[...]"; dead_end: "x";
    separator: spaces; answer: "#" and everything after it. Other bytes count as operation."""
    roles = np.full(len(text), TOKEN_ROLES.index("operation"), np.int64)
    end = text.find(ANSWER_MARK)
    end = len(text) if end < 0 else end
    roles[end:] = TOKEN_ROLES.index("answer")
    for match in re.finditer(r"[^ ]+| ", text[:end]):
        start, item = match.start(), match[0]
        if item == " ":
            roles[start] = TOKEN_ROLES.index("separator")
        elif item == BACK:
            roles[start] = TOKEN_ROLES.index("back_fork")
        else:  # the first byte chooses; then "=" opens the result and "[" the state (after the first byte)
            roles[start] = TOKEN_ROLES.index("step_fork")
            equal, bracket = item.find("=", 1), item.find("[", 1)
            if equal > 0:
                roles[start + equal:start + (bracket if bracket > equal else len(item))] = TOKEN_ROLES.index("result")
            if bracket > 0:
                roles[start + bracket:start + len(item)] = TOKEN_ROLES.index("state")
            elif equal > 0 and item.endswith(DEAD_END):
                roles[start + len(item) - 1] = TOKEN_ROLES.index("dead_end")
    return roles


def token_roles(ids) -> np.ndarray:
    """(B, T) response byte ids -> (B, T) index into TOKEN_ROLES: `trace_roles` of each row, ids outside ASCII
    (padding, special ids) read as spaces, so that they end an item."""
    ids = np.asarray(ids)
    rows = ["".join(chr(i) if 0 <= i < 128 else " " for i in row.tolist()) for row in ids.reshape(-1, ids.shape[-1])]
    return np.stack([trace_roles(row) for row in rows]).reshape(ids.shape) if rows else np.zeros(ids.shape, np.int64)


def fork_mask(ids) -> np.ndarray:
    """(B, T) bool: the branch decisions among response ids (step_fork or back_fork)."""
    return np.isin(token_roles(ids), [TOKEN_ROLES.index(r) for r in FORK_ROLES])


# ------------------------------------------------------------------------------------------------ the task
def _check_options(count, max_number, min_target, max_target, breadth, temperature, max_len) -> None:
    check_int(count, "count", MIN_COUNT, f"use {MIN_COUNT}..{MAX_COUNT} numbers")
    if count > MAX_COUNT:
        raise ValueError(f"count={count} exceeds {MAX_COUNT} (the search and its traces grow fast); lower count")
    check_int(max_number, "max_number", 1, "numbers are drawn in 1..max_number")
    check_int(min_target, "min_target", 1, "targets are positive")
    check_int(max_target, "max_target", 1, "targets are positive")
    if min_target > max_target:
        raise ValueError(f"min_target={min_target} > max_target={max_target}; pass min_target <= max_target")
    check_int(breadth, "breadth", 1, "each node below the root tries at least one child")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature={temperature!r}: pass a number >= 0 (0: children in heuristic order)")
    check_int(max_len, "max_len", 64, "traces need room for a path (64-512 bytes is the intended range)")


@dataclasses.dataclass(frozen=True)
class CountdownOptions:
    """The problem and trace options shared by the pretraining task and the RL prompts (module docstring)."""

    count: int = 4
    max_number: int = 20
    min_target: int = 10
    max_target: int = 100
    breadth: int = 2
    temperature: float = 0.1
    max_len: int = 512

    def __post_init__(self):
        _check_options(self.count, self.max_number, self.min_target, self.max_target, self.breadth, self.temperature,
                       self.max_len)


@dataclasses.dataclass(frozen=True)
class Countdown(CountdownOptions, Task):
    """Pretraining rows of countdown problems "<prompt><trace>\\n" (module docstring) packed until the next would not
    fit, graded on the trace and its newline; traces that gave up are left out unless keep_failed. "accuracy" is
    the fraction of traces predicted right in full under teacher forcing."""

    keep_failed: bool = False
    name = "countdown"
    tokenizer = ByteTokenizer()
    pad_id = ByteTokenizer.pad_id

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.keep_failed, bool):
            raise ValueError(f"keep_failed={self.keep_failed!r}: pass True or False")

    def problem(self, rng: np.random.Generator) -> dict:
        return countdown_problem(rng, self.count, self.max_number, self.min_target, self.max_target, self.breadth,
                                 self.temperature, self.max_len)

    @property
    def max_prompt_len(self) -> int:
        return len(format_prompt([self.max_number] * self.count, self.max_target))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def min_seq_len(self) -> int:
        return self.max_prompt_len + self.max_len - 1

    def row(self, rng, seq_len):
        problems = (p for p in iter(lambda: self.problem(rng), None) if p["solved"] or self.keep_failed)
        return pack_problems(((p["prompt"], p["solution"] + "\n") for p in problems), seq_len + 1)

    def accuracy(self, predictions, batch: dict) -> dict:
        return problem_accuracy(predictions, batch)


@dataclasses.dataclass(frozen=True)
class CountdownPrompts(CountdownOptions):
    """Countdown as RL prompts with a verifiable answer (an object like `m1jax.rl.rollout.ChainPrompts`): example i
    of step s is drawn from row_rng(seed, s, i); the reward checks the final path only (`countdown_reward`)."""

    seed: int = 0
    name = "countdown"
    reward_fn = staticmethod(countdown_reward)
    token_role_names = TOKEN_ROLES
    token_roles = staticmethod(token_roles)

    def __post_init__(self):
        super().__post_init__()
        check_int(self.seed, "seed", 0, "use a non-negative seed")

    @property
    def task(self) -> Countdown:
        return Countdown(**{f.name: getattr(self, f.name) for f in dataclasses.fields(CountdownOptions)})

    @property
    def max_prompt_len(self) -> int:
        return self.task.max_prompt_len

    def examples(self, step: int, count: int) -> list[dict]:
        task = self.task
        return [task.problem(row_rng(self.seed, step, i)) for i in range(count)]

    @staticmethod
    def is_correct(completion: str, example: Mapping[str, Any]) -> bool:
        return score_countdown(completion, example["prompt"])

    def options(self) -> dict:
        return dataclasses.asdict(self)
