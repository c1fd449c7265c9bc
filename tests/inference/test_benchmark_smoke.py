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
