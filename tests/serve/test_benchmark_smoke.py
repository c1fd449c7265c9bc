"""benchmarks/serve.py --smoke runs on the CPU with tiny sizes: the in-process engine (several decode steps per
call, prefill groups) at each concurrency for each K, the same through HTTP (clients in a process of their own)
when fastapi, uvicorn and httpx are installed, the static peer, and the table printed last."""
import importlib.util
import json
import os

import pytest

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
    http = [r for r in rows if r["section"] in ("http", "http+logprobs") and r["what"] == "serve"]
    if all(importlib.util.find_spec(name) for name in ("fastapi", "uvicorn", "httpx")):
        # the clients (benchmarks/http_load.py) ran in a process of their own and saw every token, counted from the
        # text (one character per token) and from the log-probabilities
        assert {(r["section"], r["concurrency"]) for r in http} == {(s, c) for s in ("http", "http+logprobs")
                                                                    for c in (1, 2, 4)}
        assert all(r["output_tokens"] == r["requests"] * 6 and r["ttft_ms"]["p50"] is not None for r in http)
    else:
        assert any(r["section"] == "http" and r["what"] == "skipped" for r in rows)
    assert any(r["section"] == "static" and r["what"] == "generate" for r in rows)
    assert any(r["section"] == "transformers" for r in rows)
    table = (tmp_path / "serve_table.md").read_text()
    assert "| engine K=3 | 4 | 8 |" in table and "static decode" in table


def test_http_load_names_a_bad_prompts_file(tmp_path):
    spec = importlib.util.spec_from_file_location("http_load", os.path.join(ROOT, "benchmarks", "http_load.py"))
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)
    empty = tmp_path / "prompts.json"
    empty.write_text("[]")
    with pytest.raises(SystemExit, match="non-empty JSON list"):
        load.main(["--url", "http://127.0.0.1:1", "--prompts", str(empty), "--max-tokens", "4", "--concurrency", "1"])
    assert load.percentiles([0.001, 0.003]) == {"p50": 2.0, "p99": 2.98}
