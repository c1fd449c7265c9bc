"""The chains task (worked long addition) and the clip mechanism's token statistics.

Every fast piece is checked against a slow twin written apart from it: the chain against a step-by-step re-check
of its own text and Python's a + b, the byte roles against a per-token regex on the prefix, the clipped-token counts
against plain loops over the tokens."""
import re
import types

import numpy as np
import pytest

from m1jax.rl.rewards import chain_reward, score_batch
from m1jax.rl.rollout import ChainPrompts, get_rl_task
from m1jax.rl.trainer import PROB_BINS, REFERENCE_BAND, TOKEN_ROLES, LossConfig, clip_token_stats, token_roles
from m1jax.tasks import TASKS, get_task
from m1jax.tasks.base import packed_texts
from m1jax.tasks.chains import (Chains, chain_answer, chain_consistent, chain_problem, chain_solution, max_chain_len,
                                score_chain)


def draw_operand(rng, digits: int) -> int:
    if digits == 1:
        return int(rng.integers(0, 10))
    return int(rng.integers(1, 10)) * 10 ** (digits - 1) + int(rng.integers(0, 10 ** (digits - 1)))


def recheck(chain: str) -> tuple[int, list[tuple[int, int, int, int]]]:
    """The twin: parse "x+y[+1]=s,..." and the answer, re-adding every step with the carry it claims."""
    steps_text, answer = chain.split("#")
    steps = []
    for step in steps_text.split(","):
        match = re.fullmatch(r"(\d)\+(\d)(\+1)?=(\d+)", step)
        assert match, step
        x, y, c, s = int(match[1]), int(match[2]), int(bool(match[3])), int(match[4])
        assert s == x + y + c
        steps.append((x, y, c, s))
    return int(answer), steps


def test_chain_solution_against_recheck_and_python_sum(rng):
    cases = [(999, 1), (0, 0), (5, 5), (10**17 - 1, 10**17 - 1), (123, 4567890)]
    cases += [(draw_operand(rng, int(rng.integers(1, 19))), draw_operand(rng, int(rng.integers(1, 19))))
              for _ in range(200)]
    for a, b in cases:
        chain = chain_solution(a, b)
        answer, steps = recheck(chain)
        assert answer == a + b
        assert len(steps) == max(len(str(a)), len(str(b)))
        carry = 0
        for i, (x, y, c, s) in enumerate(steps):  # the digits are a's and b's, from the right, and carries chain
            assert x == (a // 10**i) % 10 and y == (b // 10**i) % 10 and c == carry
            carry = int(s >= 10)
        assert len(chain) + 1 <= max_chain_len(len(steps))


def test_chain_problem_digits_and_determinism(rng):
    for _ in range(100):
        lo = int(rng.integers(1, 10))
        hi = lo + int(rng.integers(0, 10))
        seed = int(rng.integers(0, 2**31))
        p = chain_problem(np.random.default_rng(seed), lo, hi)
        assert p == chain_problem(np.random.default_rng(seed), lo, hi)
        a, b = map(int, p["prompt"][:-1].split("+"))
        assert all(lo <= len(str(v)) <= hi for v in (a, b))
        assert p["answer"] == str(a + b) and p["solution"] == chain_solution(a, b)


def test_scoring_answer_only_and_consistency():
    prompt, chain = "4837+956=", "7+6=13,3+5+1=9,8+9=17,4+0+1=5#5793"
    assert chain_solution(4837, 956) == chain
    assert chain_answer(chain + "\ngarbage#1") == "5793"
    assert score_chain(chain + "\n", "5793") and chain_consistent(chain + "\n", prompt)
    wrong_step = chain.replace("8+9=17", "8+9=16")
    assert score_chain(wrong_step, "5793") and not chain_consistent(wrong_step, prompt)  # the answer alone is graded
    assert not score_chain("7+6=13#5794", "5793") and not score_chain("5793", "5793")  # no "#": no answer
    example = {"prompt": prompt, "answer": "5793"}
    rewards, stats = score_batch(chain_reward, [chain, "x#5792", "", chain + "0"], [example] * 4)
    assert rewards.tolist() == [1.0, 0.0, 0.0, 0.0] and stats["errors"] == 0
    with pytest.raises(ValueError, match="answer"):
        score_batch(chain_reward, [chain], [{"prompt": prompt}])
    with pytest.raises(ValueError, match="prompt"):
        chain_consistent(chain, "4837-956=")


def test_pretraining_rows_grade_whole_chains(seed):
    task = get_task("chains", min_digits=2, max_digits=6)
    assert TASKS["chains"] is Chains
    batch = task.batch(seed % 1000, 3, 4, 160)
    for text, graded in packed_texts(batch):
        problems = [p for p in text.split("\n") if p]
        assert problems and all(p.split("=", 1)[1] == chain_solution(*map(int, p.split("=", 1)[0].split("+")))
                                for p in problems)
        assert graded == sum(len(p.split("=", 1)[1]) + 1 for p in problems)
    perfect = task.accuracy(batch["targets"], batch)
    assert perfect["accuracy"] == 1.0 and perfect["problems"] >= 4
    wrong = batch["targets"].copy()
    b, t = np.argwhere(batch["loss_mask"] > 0)[0]
    wrong[b, t] += 1
    assert task.accuracy(wrong, batch)["accuracy"] == pytest.approx(1 - 1 / perfect["problems"])
    with pytest.raises(ValueError, match="min_digits"):
        Chains(5, 3)
    with pytest.raises(ValueError, match="seq_len"):
        task.batch(0, 0, 1, 20)


def test_rl_prompts_are_seekable():
    task = get_rl_task("chains", min_digits=3, max_digits=5, seed=7)
    assert isinstance(task, ChainPrompts) and task.max_prompt_len == 12
    first = task.examples(4, 6)
    assert first == task.examples(4, 6) and first != task.examples(5, 6)
    assert all(len(e["prompt"]) <= task.max_prompt_len and task.is_correct(e["solution"], e) for e in first)
    assert task.reward_fn(first[0]["solution"] + "\n", first[0]) == 1.0
    with pytest.raises(ValueError, match="no option"):
        get_rl_task("chains", digits=3)


def roles_twin(text: str) -> list[str]:
    """Per-token roles by regex on each token's prefix (the slow twin of token_roles)."""
    out = []
    for t, char in enumerate(text):
        prefix = text[:t]
        if "#" in prefix:
            out.append("answer")
        elif char in ",#\n":
            out.append("separator")
        elif re.search(r"(^|,)\d\+\d$", prefix):
            out.append("carry_decision")
        elif char.isdigit() and re.search(r"=\d?$", prefix):
            out.append("sum")
        else:
            out.append("operand")
    return out


def test_token_roles_against_twin(rng):
    texts = [chain_solution(draw_operand(rng, int(rng.integers(1, 9))), draw_operand(rng, int(rng.integers(1, 9))))
             + "\n" for _ in range(20)]
    texts += ["9+9=1", "+1=2,3", "1+2+1=4#5\n", ""]  # broken and truncated responses
    width = max(map(len, texts)) + 3
    ids = np.full((len(texts), width), 256, np.int64)
    for b, text in enumerate(texts):
        ids[b, :len(text)] = list(text.encode())
    roles = token_roles(ids)
    for b, text in enumerate(texts):
        assert [TOKEN_ROLES[r] for r in roles[b, :len(text)]] == roles_twin(text), text
    decisions = [text[t] for text in texts[:20] for t, r in enumerate(roles_twin(text)) if r == "carry_decision"]
    assert set(decisions) <= {"+", "="} and len(decisions) == sum(text.count(",") + 1 for text in texts[:20])


@pytest.mark.parametrize("algo", ["cispo", "dapo", "grpo"])
def test_clip_token_stats_against_loops(rng, algo):
    width, horizon, rows = 9, 23, 12
    texts = [chain_solution(draw_operand(rng, 2), draw_operand(rng, 2)) + "\n" for _ in range(rows)]
    tokens = np.full((rows, width + horizon), 256, np.int32)
    mask = np.zeros((rows, horizon), np.float32)
    for b, text in enumerate(texts):
        tokens[b, width:width + len(text)] = list(text.encode())
        mask[b, :len(text)] = 1.0
    old = np.log(rng.uniform(1e-4, 1.0, size=(rows, horizon)))
    ratios = np.exp(rng.normal(0.0, 0.4, size=(rows, horizon)))
    advantages = rng.normal(size=rows)
    rollout = types.SimpleNamespace(tokens=tokens, prompt_width=width, old_logprobs=old, advantages=advantages)
    cfg = LossConfig(algo=algo)
    stats = clip_token_stats(rollout, ratios, mask, cfg, examples=5)
    low_eps, high_eps = REFERENCE_BAND
    upper = {"dapo": cfg.eps_high, "grpo": cfg.eps}.get(algo)
    counts = {"tokens": 0, "high": 0, "low": 0, "dropped": 0}
    role_high = {}
    hist_high = np.zeros(len(PROB_BINS) - 1, int)
    for b in range(rows):
        roles = roles_twin(texts[b])
        for t in range(len(texts[b])):
            r, a, p = ratios[b, t], advantages[b], np.exp(old[b, t])
            high = r > 1 + high_eps
            counts["tokens"] += 1
            counts["high"] += high
            counts["low"] += r < 1 - low_eps
            counts["dropped"] += upper is not None and ((a > 0 and r > 1 + upper) or (a < 0 and r < 1 - cfg.eps))
            role_high[roles[t]] = role_high.get(roles[t], 0) + high
            if high:
                hist_high[np.searchsorted(PROB_BINS, p, side="right") - 1] += 1
    assert stats["counts"] == counts
    assert {role: v[1] for role, v in stats["by_role"].items() if v[0]} == role_high
    assert stats["prob_hist"]["high"] == hist_high.tolist()
    assert sum(v[0] for v in stats["by_byte"].values()) == counts["tokens"]
    top = [t["ratio"] for t in stats["top_high"]]
    assert top == sorted(top, reverse=True) and len(top) == min(5, counts["high"])
    assert all(t["ratio"] > 1 + high_eps for t in stats["top_high"])
