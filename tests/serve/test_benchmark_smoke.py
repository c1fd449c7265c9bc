"""benchmarks/serve.py --smoke runs on the CPU with tiny sizes: the in-process engine (several decode steps per
call, prefill groups) at each concurrency for each K, the static peer, and the table printed last."""
import importlib.util
import json
import os

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_serve_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("serve_benchmark", os.path.join(ROOT, "benchmarks", "serve.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--http", "--decode-steps", "1,3", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "serve.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r.get("what") == "failed"], [r.get("trace") for r in rows]
    engine = [r for r in rows if r["section"] == "engine" and r["what"] == "serve"]
    assert {(r["decode_steps"], r["concurrency"]) for r in engine} == {(k, c) for k in (1, 3) for c in (1, 2, 4)}
    for r in engine:
        assert r["output_tokens"] == r["requests"] * 6 and r["output_tokens_per_s"] > 0
        assert r["ttft_ms"]["p50"] is not None and r["tpot_ms"]["p99"] is not None
    assert any(r["section"] == "http" and r["what"] in ("serve", "skipped") for r in rows)
    assert any(r["section"] == "static" and r["what"] == "generate" for r in rows)
    assert any(r["section"] == "transformers" for r in rows)
    table = (tmp_path / "serve_table.md").read_text()
    assert "| engine K=3 | 4 | 8 |" in table and "static decode" in table
