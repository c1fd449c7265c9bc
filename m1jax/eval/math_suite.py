"""Math with verifiable answers (MATH-500, AIME layout): prompt, final-answer extraction, verification, pass@1.

Records: {"problem": str, "answer": str | number} (an optional "id"; otherwise the line number names it).
The model is asked to reason and put its final answer in \\boxed{}. The answer taken from a completion is the
content of its last \\boxed{...} (or \\fbox{...}; nested braces kept), else its last non-empty line. It is checked
against the reference with math-verify (symbolic and numeric equivalence: 1/2 = 0.5 = \\frac{1}{2}), never by
string equality. pass@1 = mean over problems of (correct samples / K): the estimate the paper reports with K
samples at temperature 1.0, top-p 0.95. With K > 1, pass@k for k in 1, 2, 4, 8, ... <= K is reported too.
"""
from __future__ import annotations

from typing import Any, Sequence

from m1jax.eval.passk import mean_pass_at_k, metric_table, per_item_counts

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
DEFAULT_MAX_NEW_TOKENS = 2048


def extract_answer(completion: str) -> str:
    """The last \\boxed{...} / \\fbox{...} content of the completion, else its last non-empty line ('' if none)."""
    best = None
    for command in ("\\boxed", "\\fbox"):
        start = completion.rfind(command + "{")
        if start >= 0 and (best is None or start > best[0]):
            best = (start, len(command) + 1)
    if best is not None:
        begin = best[0] + best[1]
        depth = 1
        for i in range(begin, len(completion)):
            depth += {"{": 1, "}": -1}.get(completion[i], 0)
            if depth == 0:
                return completion[begin:i].strip()
        # an unclosed box (the completion ran out of tokens): fall through to the last line
    lines = [line.strip() for line in completion.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _parse(text: str):
    from math_verify import parse
    text = text.strip()
    if not text:
        return []
    parsed = parse(text if "$" in text or "\\(" in text or "\\[" in text else f"${text}$")
    return parsed or parse(text)


def is_correct(predicted: str, reference: Any) -> bool:
    """Whether the extracted answer equals the reference answer mathematically (math-verify)."""
    from math_verify import verify
    gold, guess = _parse(str(reference)), _parse(predicted)
    if not gold:
        raise ValueError(f"the reference answer {reference!r} cannot be parsed; fix the data file")
    return bool(guess) and bool(verify(gold, guess))


class MathSuite:
    """items -> prompts -> completions -> scores -> pass@k."""
    name = "math"
    required = ("problem", "answer")
    default_max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    use_chat = True

    def __init__(self, records: Sequence[dict[str, Any]]):
        self.records = list(records)
        for record in self.records:
            if not isinstance(record["problem"], str) or not record["problem"].strip():
                raise ValueError(f"line {record.get('_line', '?')}: 'problem' must be a non-empty string")
            if isinstance(record["answer"], bool) or not isinstance(record["answer"], (str, int, float)):
                raise ValueError(f"line {record.get('_line', '?')}: 'answer' must be a string or a number, got "
                                 f"{record['answer']!r}")
            _check_reference(record)
        ids = [str(r.get("id", f"line{r['_line']}")) for r in self.records]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"ids repeat in the data: {repeated[:5]}; every record needs its own id")

    def items(self) -> list[dict[str, Any]]:
        return [{"id": str(r.get("id", f"line{r['_line']}")),
                 "messages": [{"role": "user", "content": f"{r['problem']}\n{INSTRUCTION}"}],
                 "answer": r["answer"]} for r in self.records]

    def score(self, item: dict[str, Any], completion: str) -> dict[str, Any]:
        predicted = extract_answer(completion)
        try:
            correct = is_correct(predicted, item["answer"])
        except Exception as err:  # noqa: BLE001 - a verifier failure on one completion scores it 0, recorded
            return {"score": 0.0, "extracted": predicted, "error": f"{type(err).__name__}: {err}"}
        return {"score": float(correct), "extracted": predicted}

    def summarize(self, records: Sequence[dict[str, Any]], samples: int) -> dict[str, Any]:
        counts = per_item_counts(records)
        ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= samples]
        metrics = {f"pass@{k}": mean_pass_at_k(counts, k) for k in ks}
        return {"problems": len(counts), "samples_per_problem": samples, **metrics}

    def table(self, summary: dict[str, Any]) -> str:
        return metric_table(summary)


def _check_reference(record: dict[str, Any]) -> None:
    if not _parse(str(record["answer"])):
        raise ValueError(f"line {record.get('_line', '?')}: answer {record['answer']!r} cannot be parsed by "
                         "math-verify; write it as a number or a LaTeX expression")
