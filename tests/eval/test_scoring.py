"""The scorers on fixed completions (no model): known answers score correct, wrong ones are rejected."""
import re
from collections import Counter

import pytest

from m1jax.eval.cli import SAMPLES_DIR
from m1jax.eval.code_suite import CodeSuite, truncate_completion
from m1jax.eval.data import read_jsonl
from m1jax.eval.long_suite import TASKS, LongSuite, score_contains_all, score_mrcr, strip_reasoning
from m1jax.eval.math_suite import MathSuite, extract_answer, is_correct
from m1jax.eval.prompts import plain_prompt
from m1jax.tokenizer import ByteTokenizer


# ------------------------------------------------------------------------------------------------ math
@pytest.mark.parametrize("completion, expected", [
    ("so x = \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("first \\boxed{3}, then corrected: \\boxed{4}", "4"),
    ("\\fbox{7} at the end", "7"),
    ("\\boxed{a} and \\fbox{b}", "b"),
    ("steps\nmore steps\n\n  42  \n", "42"),
    ("ran out \\boxed{\\frac{1}{2", "ran out \\boxed{\\frac{1}{2"),  # unclosed box: the last line
    ("", ""),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_math_known_answers_right_and_wrong():
    suite = MathSuite(read_jsonl(f"{SAMPLES_DIR}/math.jsonl", required=MathSuite.required))
    equivalent = {"half": "0.5", "probability-two-heads": "1/4", "sqrt-50": "\\sqrt{50}", "triangle-area": "24.0"}
    for item in suite.items():
        right = equivalent.get(item["id"], str(item["answer"]))
        assert suite.score(item, f"Thinking...\nSo the answer is \\boxed{{{right}}}.")["score"] == 1.0, item
        assert suite.score(item, "The answer is \\boxed{17}")["score"] == 0.0, item
        assert suite.score(item, "I do not know")["score"] == 0.0, item
    assert is_correct("6", 6) and not is_correct("", "6") and not is_correct("(-2, 3)", "(-2, 2)")


def test_math_bad_records():
    with pytest.raises(ValueError, match="'problem' must be a non-empty string"):
        MathSuite([{"problem": "", "answer": "1", "_line": 3}])
    with pytest.raises(ValueError, match="line 4: 'answer' must be a string or a number"):
        MathSuite([{"problem": "p", "answer": [1], "_line": 4}])


# ------------------------------------------------------------------------------------------------ code
@pytest.fixture(scope="module")
def code_suite():
    return CodeSuite(read_jsonl(f"{SAMPLES_DIR}/code.jsonl", required=CodeSuite.required), timeout_s=2.0)


def test_code_canonical_solutions_pass_and_wrong_ones_fail(code_suite):
    for record, item in zip(code_suite.records, code_suite.items()):
        # HumanEval's stop rule cuts the trailing top-level definition off before running
        assert code_suite.score(item, record["canonical_solution"] + "\n\ndef extra(:\n")["score"] == 1.0
        wrong = code_suite.score(item, "    return None\n")
        assert wrong["score"] == 0.0 and wrong["outcome"] in ("failed", "error")


def test_code_fenced_program_timeout_and_crash(code_suite):
    item = code_suite.items()[0]
    fenced = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\n"
    assert code_suite.score(item, fenced)["score"] == 1.0
    assert code_suite.score(item, "    while True:\n        pass\n")["outcome"] == "timeout"
    crash = code_suite.score(item, "    return undefined_name\n")
    assert crash["score"] == 0.0 and crash["outcome"] == "error" and "NameError" in crash["stderr_tail"]
    assert truncate_completion("    return 1\nprint('x')\n") == "    return 1"


def test_code_bad_records():
    base = {"task_id": "t", "prompt": "def f():\n", "test": "def check(c): pass", "entry_point": "f", "_line": 1}
    with pytest.raises(ValueError, match="entry_point 'f g' is not a Python name"):
        CodeSuite([base | {"entry_point": "f g"}])
    with pytest.raises(ValueError, match="task_id values repeat"):
        CodeSuite([base, base | {"_line": 2}])


# ------------------------------------------------------------------------------------------------ long
def test_long_scorers():
    assert strip_reasoning("<think>1234</think> 5678") == "5678"
    assert score_contains_all("<think>1234567</think>no idea", ["1234567"]) == 0.0
    assert score_contains_all("It is 1234567.", ["1234567"]) == 1.0
    assert score_contains_all("abc and XYZ", ["ABC", "xyz", "q", "r"]) == 0.5
    assert score_mrcr("code12 the poem", "code12", "the poem") == 1.0
    assert score_mrcr("the poem code12", "code12", "the poem") == 0.0
    assert 0.0 < score_mrcr("code12 the poe", "code12", "the poem") < 1.0


@pytest.fixture
def long_items(seed):
    tokenizer = ByteTokenizer()  # one byte a token: the tightest fit of the tasks' fixed text
    suite = LongSuite(tokenizer.encode, lengths=[1024, 2048], items_per_length=2, seed=seed)
    return tokenizer, suite, suite.items()


def test_long_items_fit_hold_their_answers_and_score(long_items):
    tokenizer, suite, items = long_items
    assert {item["task"] for item in items} == set(TASKS) and len(items) == 2 * len(TASKS) * 2
    for item in items:
        prompt = plain_prompt(item["messages"])
        assert len(tokenizer.encode(prompt)) <= item["length"], item["id"]
        if item["task"] == "mrcr":
            code, target = item["answers"]
            assert suite.score(item, f"{code}{target}")["score"] == 1.0
            assert suite.score(item, target)["score"] == 0.0
            continue
        for answer in item["answers"]:
            assert answer in prompt, item["id"]
        assert suite.score(item, "<think>x</think>" + " ".join(item["answers"]))["score"] == 1.0
        assert suite.score(item, "nothing here")["score"] == 0.0


def test_long_items_mean_what_they_ask(long_items):
    """Each item's answer follows from its text: the asked needle, the chain, the common words, the n-th poem."""
    _, _, items = long_items
    for item in items:
        text = item["messages"][-1]["content"]
        if item["task"].startswith("niah"):
            key = re.search(r"special magic numbers? for (\w+) mentioned", text).group(1)
            assert sorted(re.findall(rf"numbers for {key} is: (\d+)\.", text)) == sorted(item["answers"])
        elif item["task"] == "vt":
            value = re.search(r"assigned the value (\d+)", text).group(1)
            holds = {name for name, v in re.findall(r"VAR (\w+) = (\d+)\.", text) if v == value}
            for name, source in re.findall(r"VAR (\w+) = VAR (\w+)\.", text):  # statements in text order
                if source in holds:
                    holds.add(name)
            assert holds == set(item["answers"])
        elif item["task"] == "cwe":
            counts = Counter(re.findall(r"\d+\. (\w+)", text))
            least_common = min(counts[w] for w in item["answers"])
            assert all(counts[w] < least_common for w in counts if w not in item["answers"])
        else:
            nth, form, topic = re.search(r"the (\d)\w\w \(1 indexed\) (\w+) about (\w+)\.", text).groups()
            replies = [reply["content"] for ask, reply in zip(item["messages"][:-1:2], item["messages"][1::2])
                       if ask["content"] == f"Write a {form} about {topic}."]
            assert replies[int(nth) - 1] == item["answers"][1] and len(replies) >= int(nth)


def test_long_items_are_reproducible_and_checked(long_items):
    _, suite, items = long_items
    assert suite.make_item("vt", 2048, 1) == next(i for i in items if i["id"] == "vt/2048/1")
    with pytest.raises(ValueError, match="unknown long-context task"):
        LongSuite(ByteTokenizer().encode, tasks=["haystack"])
    with pytest.raises(ValueError, match="below 1024 tokens"):
        LongSuite(ByteTokenizer().encode, lengths=[100])


def test_long_items_fit_a_verbose_template(seed):
    """Items are fitted to the prompt as rendered: a template that adds 100 tokens a message still fits."""
    tokenizer = ByteTokenizer()
    render = lambda messages: "".join("<" * 100 + m["content"] for m in messages)  # noqa: E731
    suite = LongSuite(tokenizer.encode, lengths=[2048], items_per_length=1, seed=seed, render=render)
    for item in suite.items():
        assert len(tokenizer.encode(render(item["messages"]))) <= 2048, item["id"]
