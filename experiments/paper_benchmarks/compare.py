"""Compare `m1jax eval` results with the paper's reported scores (paper_scores.json beside this file).

    python experiments/paper_benchmarks/compare.py --model MiniMax-M1-80k \
        "AIME 2024=runs/eval-aime/results.json" "MATH-500=runs/eval-math500/results.json"

Prints a markdown table: benchmark, the paper's score, ours (the benchmark's m1jax_metric read from results.json),
and the difference in points.
"""
from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def our_score(result: dict, metric: str) -> float:
    """The metric named in paper_scores.json from a results.json, in percent."""
    summary = result["summary"]
    if metric.startswith("scores.mrcr"):
        by_length = summary["scores"]["mrcr"]
        longest = max(by_length, key=int)  # the longest length that was run
        return 100 * by_length[longest]
    return 100 * summary[metric]


def compare(model: str, runs: dict[str, str]) -> str:
    with open(os.path.join(HERE, "paper_scores.json"), encoding="utf-8") as f:
        paper = {b["name"]: b for b in json.load(f)["benchmarks"]}
    rows = ["| benchmark | paper | ours | difference |", "|---|---|---|---|"]
    for name, path in runs.items():
        if name not in paper:
            raise ValueError(f"unknown benchmark {name!r}; paper_scores.json has {sorted(paper)}")
        bench = paper[name]
        if bench["m1jax_metric"] is None:
            raise ValueError(f"{name}: no m1jax suite runs it ({bench['note']})")
        with open(path, encoding="utf-8") as f:
            ours = our_score(json.load(f), bench["m1jax_metric"])
        rows.append(f"| {name} | {bench[model]:.1f} | {ours:.1f} | {ours - bench[model]:+.1f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="MiniMax-M1-80k", choices=["MiniMax-M1-40k", "MiniMax-M1-80k"])
    parser.add_argument("runs", nargs="+", help='"BENCHMARK=path/to/results.json"')
    args = parser.parse_args()
    runs = dict(run.split("=", 1) for run in args.runs)
    print(compare(args.model, runs))


if __name__ == "__main__":
    main()
