"""benchmarks/inference.py --smoke runs every section on the CPU with tiny sizes and writes its table and plot."""
import importlib.util
import json
import os

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_inference_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("inference_benchmark", os.path.join(ROOT, "benchmarks",
                                                                                     "inference.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "inference.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r.get("what") == "failed"]
    done = {(r["section"], r["what"]) for r in rows}
    assert {("long", "prefill"), ("long", "decode latency ratio"), ("sweep", "decode batch 1"), ("hf", "prefill"),
            ("hf", "decode")} <= done
    assert ("transformers", "prefill") in done or ("transformers", "skipped") in done
    prefill = next(r for r in rows if r["what"] == "prefill" and r["section"] == "long")
    assert prefill["context"] == 300 and prefill["tokens_per_s"] > 0
    table = (tmp_path / "inference_table.md").read_text()
    assert "prefill tok/s, T=40" in table and "decode ms/token" in table
    assert (tmp_path / "inference_decode_latency.svg").read_text().startswith("<svg")


def test_inference_benchmark_split_section_smoke(tmp_path):
    """--sections split: both forms of one-query attention at both contexts, the table's ratio lines, and the
    module switch put back."""
    from m1jax.layers import softmax_attention
    shipped = softmax_attention.DECODE_SPLIT_MIN_SLOTS
    spec = importlib.util.spec_from_file_location("inference_benchmark_split", os.path.join(ROOT, "benchmarks",
                                                                                           "inference.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--sections", "split", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "inference.jsonl").read_text().splitlines()]
    measured = {(r["attention"], r["context"]) for r in rows if r.get("section") == "split" and r["ms_per_token"] > 0}
    assert measured == {(form, c) for form in ("dense", "split") for c in (40, 300)}
    table = (tmp_path / "inference_table.md").read_text()
    assert "dense one-query attention: 300 vs 40" in table and "split one-query attention: 300 vs 40" in table
    assert softmax_attention.DECODE_SPLIT_MIN_SLOTS == shipped
