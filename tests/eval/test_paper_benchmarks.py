"""experiments/paper_benchmarks: the recorded paper scores are well formed, and compare.py reads results.json."""
import json
import os
import runpy

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FOLDER = os.path.join(ROOT, "experiments", "paper_benchmarks")


def test_scores_have_sources_and_both_models():
    with open(os.path.join(FOLDER, "paper_scores.json")) as f:
        paper = json.load(f)
    assert "2506.13585" in paper["source"]["document"]
    for bench in paper["benchmarks"]:
        for model in ("MiniMax-M1-40k", "MiniMax-M1-80k"):
            assert 0 < bench[model] <= 100, bench
        assert bench["m1jax_suite"] in ("math", "code", "long", None)


def test_compare_reads_results(tmp_path):
    compare = runpy.run_path(os.path.join(FOLDER, "compare.py"))["compare"]
    math = tmp_path / "math.json"
    math.write_text(json.dumps({"summary": {"pass@1": 0.5}}))
    long = tmp_path / "long.json"
    long.write_text(json.dumps({"summary": {"scores": {"mrcr": {"1024": 0.1, "1048576": 0.25}}}}))
    table = compare("MiniMax-M1-80k", {"AIME 2024": str(math), "OpenAI-MRCR (1M)": str(long)})
    assert "| AIME 2024 | 86.0 | 50.0 | -36.0 |" in table and "| OpenAI-MRCR (1M) | 56.2 | 25.0 | -31.2 |" in table
    with pytest.raises(ValueError, match="no m1jax suite"):
        compare("MiniMax-M1-80k", {"SWE-bench Verified": str(math)})
