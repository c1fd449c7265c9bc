"""Evaluation: benchmark suites (math, code, long context), scoring, resumable results files.

    from m1jax.eval import MathSuite, CodeSuite, LongSuite, run_eval, pass_at_k
    suite = MathSuite(read_jsonl("math500.jsonl", required=MathSuite.required))
    result = run_eval(suite, model, params, tokenizer, out="runs/eval-math", samples=4)

Command line: `m1jax eval` (m1jax/eval/cli.py); file formats and results in m1jax/eval/README.md.
"""
from m1jax.eval.code_suite import CodeSuite
from m1jax.eval.data import SampleLog, read_jsonl
from m1jax.eval.long_suite import LongSuite
from m1jax.eval.math_suite import MathSuite, extract_answer, is_correct
from m1jax.eval.passk import mean_pass_at_k, pass_at_k
from m1jax.eval.runner import run_eval

__all__ = ["CodeSuite", "LongSuite", "MathSuite", "SampleLog", "extract_answer", "is_correct", "mean_pass_at_k",
           "pass_at_k", "read_jsonl", "run_eval"]
