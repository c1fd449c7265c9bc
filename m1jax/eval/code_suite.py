"""Code generation, HumanEval layout: completions run against the problem's tests in the sandbox; pass@k.

Records: {"task_id", "prompt", "test", "entry_point"} (HumanEval / MBPP-converted files). The model continues
the prompt (a signature and docstring) as a base model would, without a chat template. The completion is cut at
the first of HumanEval's stop strings at line start (a new top-level def / class / if / print / comment); a
completion holding a fenced ```python block is taken as a whole program instead. The program

    prompt + completion + "\\n" + test + "\\ncheck(entry_point)\\n"

runs in `m1jax.rl.rewards.run_program` (a separate isolated interpreter with time, memory and output limits; see
that module for what the sandbox guarantees). It passes when `check` returns without an exception. The score is
the unbiased pass@k (m1jax.eval.passk) for k in 1, 10, 100 up to the number of samples K.
"""
from __future__ import annotations

from typing import Any, Sequence

from m1jax.eval.passk import mean_pass_at_k, metric_table, per_item_counts
from m1jax.rl.rewards import CODE_FENCE  # one definition of a fenced code block, shared with the RL reward

STOP_STRINGS = ("\nclass ", "\ndef ", "\n#", "\nif ", "\nprint(")
DEFAULT_MAX_NEW_TOKENS = 512


def truncate_completion(completion: str) -> str:
    """The completion up to the first stop string (HumanEval's rule: the function body only)."""
    cut = min((i for i in (completion.find(s) for s in STOP_STRINGS) if i >= 0), default=len(completion))
    return completion[:cut]


def program(item: dict[str, Any], completion: str) -> tuple[str, str]:
    """(source, tests) to run: the completed function, and the record's test with the check call."""
    blocks = CODE_FENCE.findall(completion)
    source = blocks[-1] if blocks else item["prompt"] + truncate_completion(completion)
    return source, f"{item['test']}\n\ncheck({item['entry_point']})\n"


class CodeSuite:
    name = "code"
    required = ("task_id", "prompt", "test", "entry_point")
    default_max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    use_chat = False
    thread_safe_scoring = True  # each score is a subprocess: a batch is scored in parallel threads

    def __init__(self, records: Sequence[dict[str, Any]], *, timeout_s: float = 5.0, memory_mb: int = 1024):
        for record in records:
            for field in self.required:
                if not isinstance(record[field], str) or not record[field].strip():
                    raise ValueError(f"line {record.get('_line', '?')}: {field!r} must be a non-empty string")
            if not record["entry_point"].isidentifier():
                raise ValueError(f"line {record['_line']}: entry_point {record['entry_point']!r} is not a Python "
                                 "name")
        ids = [r["task_id"] for r in records]
        if len(set(ids)) != len(ids):
            raise ValueError(f"task_id values repeat: {sorted({i for i in ids if ids.count(i) > 1})[:5]}")
        self.records, self.timeout_s, self.memory_mb = list(records), timeout_s, memory_mb

    def items(self) -> list[dict[str, Any]]:
        return [{"id": r["task_id"], "text": r["prompt"], "prompt": r["prompt"], "test": r["test"],
                 "entry_point": r["entry_point"]} for r in self.records]

    def score(self, item: dict[str, Any], completion: str) -> dict[str, Any]:
        from m1jax.rl.rewards import run_program
        source, tests = program(item, completion)
        result = run_program(source, tests, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        return {"score": float(result.outcome == "passed"), "outcome": result.outcome,
                "stderr_tail": result.stderr_tail[-300:] if result.outcome != "passed" else ""}

    def summarize(self, records: Sequence[dict[str, Any]], samples: int) -> dict[str, Any]:
        counts = per_item_counts(records)
        metrics = {f"pass@{k}": mean_pass_at_k(counts, k) for k in (1, 10, 100) if k <= samples}
        outcomes: dict[str, int] = {}
        for record in records:
            outcomes[record["outcome"]] = outcomes.get(record["outcome"], 0) + 1
        return {"problems": len(counts), "samples_per_problem": samples, **metrics, "outcomes": outcomes}

    def table(self, summary: dict[str, Any]) -> str:
        outcomes = ", ".join(f"{name} {count}" for name, count in sorted(summary["outcomes"].items()))
        return metric_table(summary) + f"outcomes: {outcomes}\n"
