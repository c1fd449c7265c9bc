"""The countdown task (search traces that branch): problems, traces, the verifier, fork-token roles, rows and prompts.

The module's solver, verifier and roles are checked against slow twins written apart from them here: a brute-force
solver over ordered pairs, a path replay on a plain list, per-character roles read from each character's prefix."""
import re
import types

import numpy as np
import pytest

from m1jax.rl.rewards import score_batch
from m1jax.rl.rollout import get_rl_task
from m1jax.rl.trainer import LossConfig, clip_token_stats
from m1jax.tasks import TASKS, get_task, row_rng
from m1jax.tasks.base import packed_texts
from m1jax.tasks.countdown import (FORK_ROLES, TOKEN_ROLES, Countdown, CountdownPrompts, check_path,
                                   countdown_problem, countdown_reward, fork_mask, parse_prompt, score_countdown,
                                   solvable, token_roles, trace_consistent)

SETTINGS = [{}, {"count": 3, "max_number": 9, "min_target": 1, "max_target": 30},
            {"count": 5, "max_number": 12, "breadth": 3, "temperature": 1.0, "max_len": 300}]


def solve_twin(numbers: list[int], target: int) -> bool:
    """Brute force: pick any ordered pair, combine it by any rule that gives a positive integer, recurse."""
    if len(numbers) == 1:
        return numbers[0] == target
    for i, a in enumerate(numbers):
        for j, b in enumerate(numbers):
            if i == j:
                continue
            rest = [x for k, x in enumerate(numbers) if k not in (i, j)]
            results = [a + b, a * b] + ([a - b] if a > b else []) + ([a // b] if a % b == 0 else [])
            if any(solve_twin(rest + [c], target) for c in results):
                return True
    return False


def path_twin(path: str, numbers, target: int) -> bool:
    """Replay "a op b=c,..." on a plain list: operands removed, the result checked and appended, [target] at the end."""
    pool = list(numbers)
    for step in path.split(","):
        match = re.fullmatch(r"([1-9]\d*)([-+*/])([1-9]\d*)=([1-9]\d*)", step)
        if match is None:
            return False
        a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
        for x in (a, b):
            if x not in pool:
                return False
            pool.remove(x)
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if a % b == 0 else -1}[op]
        if value != c or value <= 0:
            return False
        pool.append(c)
    return pool == [target]


def roles_twin(text: str) -> list[str]:
    """Per-character roles from each character's prefix (the slow twin of trace_roles)."""
    out = []
    for t, char in enumerate(text):
        prefix = text[:t]
        item = prefix.rsplit(" ", 1)[-1]  # the item so far
        if "#" in prefix or char == "#":
            out.append("answer")
        elif char == " ":
            out.append("separator")
        elif item == "":
            out.append("back_fork" if char == "<" and text[t + 1:t + 2] in ("", " ") else "step_fork")
        elif "[" in item[1:] or char == "[":
            out.append("state")
        elif char == "x" and text[t + 1:t + 2] in ("", " ", "#") and "=" in item[1:]:
            out.append("dead_end")
        elif "=" in item[1:] or char == "=":
            out.append("result")
        else:
            out.append("operation")
    return out


@pytest.mark.parametrize("options", SETTINGS)
def test_problems_are_solvable_and_traces_verify(options, seed):
    task = Countdown(**options)
    for i in range(40 if task.count < 5 else 8):
        problem = task.problem(row_rng(seed, 0, i))
        numbers, target = problem["numbers"], problem["target"]
        assert len(numbers) == task.count and all(1 <= x <= task.max_number for x in numbers)
        assert task.min_target <= target <= task.max_target
        assert parse_prompt(problem["prompt"]) == (tuple(numbers), target)
        assert solvable(numbers, target) and (task.count == 5 or solve_twin(list(numbers), target))
        trace = problem["solution"] + "\n"
        assert trace_consistent(trace, problem["prompt"]), trace
        assert score_countdown(trace, problem["prompt"]) == problem["solved"]
        if problem["solved"]:
            assert path_twin(problem["answer"], numbers, target) and trace.endswith("#" + problem["answer"] + "\n")
        else:
            assert trace.endswith("#fail\n")
        assert len(trace) <= task.max_len


def test_solver_against_twin(rng):
    for _ in range(60):
        numbers = [int(x) for x in rng.integers(1, 10, size=int(rng.integers(2, 4)))]
        target = int(rng.integers(1, 60))
        assert solvable(numbers, target) == solve_twin(numbers, target), (numbers, target)


def test_verifier_rejects_what_is_not_a_solution():
    prompt = "20,2,9,2>58:"
    numbers, target = parse_prompt(prompt)
    good = "20*2=40,9*2=18,40+18=58"
    assert check_path(good, numbers, target) and path_twin(good, numbers, target)
    assert score_countdown("12+1=13[..] garbage <  #" + good + "\n", prompt)  # only the final path counts
    assert check_path("2*20=40,2*9=18,18+40=58", numbers, target)  # operand order is free for + and *
    bad = {
        "wrong arithmetic": "20*2=40,9*2=19,40+19=58",
        "reused number": "20*2=40,20+2=22,40+18=58",
        "number not given": "20*2=40,9*2=18,40+18=58,58*1=58",
        "unused number": "20*2=40,40+18=58",
        "wrong target": "20*2=40,9*2=18,40-18=22",
        "negative": "2-9=7,20*2=40,40+7=47",
        "inexact division": "9/2=4,20*2=40,40+4=44",
        "leading zero": "20*02=40,9*2=18,40+18=58",
        "malformed": "20*2=40;9*2=18;40+18=58",
        "spaces inside": "20*2 = 40,9*2=18,40+18=58",
        "empty": "",
        "failed search": "fail",
    }
    for why, path in bad.items():
        assert not check_path(path, numbers, target), why
        assert not path_twin(path, numbers, target), why
        assert countdown_reward("#" + path + "\n", {"prompt": prompt}) == 0.0, why
    assert countdown_reward("no answer mark\n", {"prompt": prompt}) == 0.0
    assert countdown_reward("#" + good + "\n", {"prompt": prompt}) == 1.0
    assert countdown_reward("x\n#" + good, {"prompt": prompt}) == 0.0  # the answer is on the first line
    with pytest.raises(ValueError, match="prompt"):
        countdown_reward("#" + good, {"prompt": "20+2=22"})


def test_traces_backtrack_at_a_rate_and_stay_in_bounds(seed):
    problems = [countdown_problem(row_rng(seed, 1, i)) for i in range(300)]
    lengths = np.array([len(p["solution"]) + 1 for p in problems])
    backs = np.mean([" < " in p["solution"] for p in problems])
    dead_ends = np.mean([re.search(r"x( |$)", p["solution"]) is not None for p in problems])
    solved = np.mean([p["solved"] for p in problems])
    # measured over 1000 draws: 72% back out of a branch, 78% hit a dead end, 85% find a path (bounds: > 7 sigma)
    assert 0.5 < backs < 0.9 and 0.6 < dead_ends < 0.95 and 0.7 < solved < 0.97
    assert lengths.max() <= 512 and lengths.min() >= 40 and np.median(lengths) > 100
    short = [countdown_problem(row_rng(seed, 2, i), max_len=100) for i in range(50)]
    assert max(len(p["solution"]) + 1 for p in short) <= 100 and any(not p["solved"] for p in short)


def test_draws_are_reproducible_from_the_seed(seed):
    first = [countdown_problem(row_rng(seed, 3, i)) for i in range(5)]
    assert first == [countdown_problem(row_rng(seed, 3, i)) for i in range(5)]
    assert first != [countdown_problem(row_rng(seed + 1, 3, i)) for i in range(5)]
    task = get_task("countdown")
    batch = task.batch(seed % 1000, 2, 2, task.min_seq_len)
    again = task.batch(seed % 1000, 2, 2, task.min_seq_len)
    assert all(np.array_equal(batch[k], again[k]) for k in batch)


@pytest.mark.parametrize("options,argument", [
    ({"count": 2}, "count"), ({"count": 6}, "count"), ({"max_number": 0}, "max_number"),
    ({"min_target": 0}, "min_target"), ({"min_target": 50, "max_target": 10}, "min_target"),
    ({"breadth": 0}, "breadth"), ({"temperature": -1.0}, "temperature"), ({"max_len": 32}, "max_len"),
    ({"keep_failed": "yes"}, "keep_failed"), ({"count": 4.5}, "count"),
])
def test_bad_options_name_the_argument(options, argument):
    with pytest.raises(ValueError, match=argument):
        Countdown(**options)
    if argument != "keep_failed":
        with pytest.raises(ValueError, match=argument):
            get_rl_task("countdown", **options)


def test_other_refusals():
    with pytest.raises(ValueError, match="no option"):
        get_task("countdown", numbers=4)
    with pytest.raises(ValueError, match="widen min_target..max_target"):
        countdown_problem(row_rng(0, 0, 0), count=3, max_number=2, min_target=100, max_target=200)
    with pytest.raises(ValueError, match="seed"):
        CountdownPrompts(seed=-1)
    with pytest.raises(ValueError, match="countdown prompt"):
        parse_prompt("1,2,3=6")
    with pytest.raises(ValueError, match="seq_len"):
        get_task("countdown").batch(0, 0, 1, 100)


def test_token_roles_against_twin(seed):
    texts = [countdown_problem(row_rng(seed, 4, i))["solution"] + "\n" for i in range(12)]
    texts += ["12+8=20[3,20] <", "#fail\n", "", "9x9 << 3+3=6x#1+", "20-1=19[19]x <x =x [1=2]x 5[=",
              "1=2\nx"]  # broken and truncated responses
    width = max(map(len, texts)) + 3
    ids = np.full((len(texts), width), 256, np.int64)
    for b, text in enumerate(texts):
        ids[b, :len(text)] = list(text.encode())
    roles = token_roles(ids)
    assert roles.shape == ids.shape
    for b, text in enumerate(texts):
        assert [TOKEN_ROLES[r] for r in roles[b, :len(text)]] == roles_twin(text), text
    forks = fork_mask(ids)
    for b, text in enumerate(texts[:12]):  # one step_fork per attempted step, one back_fork per "<"
        search = text.split("#")[0]
        steps = len(re.findall(r"(^| )\d", search))
        assert forks[b].sum() == steps + search.count("<") and set(FORK_ROLES) <= set(TOKEN_ROLES)


def test_pretraining_rows_hold_solved_traces(seed):
    task = get_task("countdown", count=3, max_number=9, min_target=1, max_target=30, max_len=120)
    assert TASKS["countdown"] is Countdown and task.vocab_size == 260
    batch = task.batch(seed % 1000, 1, 3, 400)
    for text, graded in packed_texts(batch):
        lines = [line for line in text.split("\n") if line]
        assert lines and graded == sum(len(line.split(":", 1)[1]) + 1 for line in lines)
        for line in lines:
            prompt, trace = line.split(":", 1)
            assert trace_consistent(trace, prompt + ":") and score_countdown(trace, prompt + ":")
    perfect = task.accuracy(batch["targets"], batch)
    assert perfect["accuracy"] == 1.0 and perfect["problems"] >= 3
    kept = get_task("countdown", max_len=64, keep_failed=True).batch(0, 0, 4, 100)
    assert b"#fail" in bytes(int(t) for t in kept["targets"].reshape(-1) if t < 256)


def test_rl_prompts_and_clip_statistics_by_fork_role(rng):
    task = get_rl_task("countdown", seed=7)
    assert isinstance(task, CountdownPrompts) and task.max_prompt_len == len("20,20,20,20>100:")
    first = task.examples(4, 8)
    assert first == task.examples(4, 8) and first != task.examples(5, 8)
    assert all(len(e["prompt"]) <= task.max_prompt_len for e in first)
    rewards, stats = score_batch(task.reward_fn, [e["solution"] + "\n" for e in first], first)
    assert rewards.tolist() == [float(e["solved"]) for e in first] and stats["errors"] == 0
    with pytest.raises(ValueError, match="examples\\[0\\]"):
        score_batch(task.reward_fn, ["#1+1=2"], [{"answer": "2"}])
    # the trainer's clip statistics count by the task's roles when the task has them
    texts = [e["solution"] + "\n" for e in first]
    width, horizon = task.max_prompt_len, max(map(len, texts))
    tokens = np.full((len(texts), width + horizon), 256, np.int32)
    mask = np.zeros((len(texts), horizon), np.float32)
    for b, text in enumerate(texts):
        tokens[b, width:width + len(text)] = list(text.encode())
        mask[b, :len(text)] = 1.0
    ratios = np.exp(rng.normal(0.0, 0.4, size=mask.shape))
    rollout = types.SimpleNamespace(tokens=tokens, prompt_width=width, advantages=rng.normal(size=len(texts)),
                                    old_logprobs=np.log(rng.uniform(1e-3, 1.0, size=mask.shape)))
    stats = clip_token_stats(rollout, ratios, mask, LossConfig(algo="dapo"), roles_fn=task.token_roles,
                             role_names=task.token_role_names)
    assert list(stats["by_role"]) == list(TOKEN_ROLES)
    fork_high = sum(stats["by_role"][r][1] for r in FORK_ROLES)
    forks = fork_mask(tokens[:, width:]) & (mask > 0)
    assert fork_high == int((forks & (ratios > 1.28)).sum())
    assert sum(v[0] for v in stats["by_role"].values()) == int(mask.sum())
