"""m1jax.serve.timeline: the scheduler turns of a batcher run from client threads, timed, nested, and summed to the
run's wall time; and benchmarks/serve.py --timeline writes them. Both tests use the benchmark's --smoke model and
batcher shapes, so the second one reuses the steps the first compiled."""
import gc
import importlib.util
import json
import os
import threading
import time

import pytest

import m1jax
from benchmarks.common import SMOKE_CONFIG, policy_for, random_params
from m1jax.serve.batcher import Batcher, Job
from m1jax.serve.timeline import CATEGORY, IDLE, Timeline, summary_table

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
PROMPT, OUTPUT, K = 24, 6, 2  # benchmarks/serve.py --smoke --decode-steps 2


def test_timeline_of_two_waves(tmp_path):
    policy = policy_for("smoke")
    model = m1jax.M1ForCausalLM(SMOKE_CONFIG, policy=policy)
    params = random_params(SMOKE_CONFIG, policy=policy)
    clients = 4
    batcher = Batcher(model, params, lambda ids: "", max_batch=clients, max_context=64, chunk_size=16,
                      decode_steps=K, prefill_batch=2)
    batcher.start_thread()
    timeline = Timeline(batcher)
    try:
        def client(seed):
            for i in range(2):  # two waves
                job = batcher.submit(Job([seed + i + 1] * PROMPT, OUTPUT))
                job.done.wait(60)
                assert job.error is None and len(job.token_ids) == OUTPUT
                if seed == 0 and i == 0:
                    gc.collect()  # a full collector pass during the run: the timeline records it

        threads = [threading.Thread(target=client, args=(10 * c,)) for c in range(clients)]
        begin = timeline.begin()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        wall = time.perf_counter() - begin
        timeline.end(begin + wall)
        time.sleep(0.1)  # the last turn may still be closing
    finally:
        batcher.stop(timeout=30)
    timeline.detach()
    assert "_turn" not in batcher.__dict__ and "submit" not in batcher.__dict__
    assert timeline._gc not in gc.callbacks
    records = timeline.records()
    passes = [r for r in records if r["event"] == "gc"]
    assert any(r["generation"] == 2 for r in passes) and all(r["end"] >= r["start"] >= 0 for r in passes)
    events = [r for r in records if r["event"] not in ("request", "dispatch", "gc")]
    by_kind = lambda kind: [e for e in events if e["event"] == kind]
    assert len([r for r in records if r["event"] == "request"]) == 2 * clients
    for kind in ("turn", "prefill", "insert", "launch", "read", "decode_wait", "read_first", "prefill_wait"):
        assert by_kind(kind), kind
    for e in events:
        assert e["end"] >= e["start"] >= 0 and e["self_seconds"] >= -1e-6, e
    turns = by_kind("turn")
    for a, b in zip(turns, turns[1:]):  # one scheduler thread: turns never overlap
        assert b["start"] >= a["end"]
    for kinds in (("prefill",), ("decode_wait", "prefill_wait"), ("decode_wait",), ("turn",)):
        spans = [e for e in events if e["event"] in kinds and e["start"] < wall]
        assert spans and all(e["seconds"] > 0 for e in spans), kinds
        assert sum(min(e["end"], wall) - e["start"] for e in spans) <= wall
    ids = {e["id"]: e for e in events}
    for e in events:  # nested in a span of the same thread that contains it
        if e["parent"] is not None and e["parent"] in ids:
            parent = ids[e["parent"]]
            assert parent["start"] <= e["start"] and e["end"] <= parent["end"] + 1e-6
    assert {ids[e["parent"]]["event"] for e in by_kind("decode_wait")} == {"read"}
    assert sum(e["useful_tokens"] for e in by_kind("launch")) == 2 * clients * (OUTPUT - 1)  # the first: prefill

    summary = timeline.summary(wave=clients)
    assert summary["wall"] == pytest.approx(wall, abs=1e-5)
    assert set(summary["categories"]) == set(CATEGORY.values()) | {IDLE}
    assert sum(summary["categories"].values()) == pytest.approx(wall, abs=1e-4)
    assert all(v >= -1e-6 for v in summary["categories"].values())
    assert summary["categories"]["device wait: decode tokens"] > 0 and summary["decode_calls"] == len(
        by_kind("launch"))
    assert 0 < summary["occupancy"] <= 1 and len(summary["waves"]) == 2
    assert summary["waves"][0]["gap_ms"] > 0 and summary["waves"][1]["first_decode_ms"] is not None
    assert summary["gc"]["passes"] == len(passes) and summary["gc"]["full"] >= 1 and summary["gc"]["seconds"] > 0
    text = summary_table(summary, "test")
    assert "| device wait: decode tokens |" in text and f"wave 2 ({clients} requests)" in text
    assert "Python gc:" in text

    path = tmp_path / "timeline.jsonl"
    timeline.write(str(path), wave=clients, concurrency=clients)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[-1]["event"] == "summary" and all(line["concurrency"] == clients for line in lines)


def test_serve_benchmark_timeline(tmp_path, monkeypatch, capsys):
    """--timeline: timeline.jsonl has every engine run's events and summary, and the summary is printed last."""
    spec = importlib.util.spec_from_file_location("serve_benchmark", os.path.join(ROOT, "benchmarks", "serve.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(Batcher, "warm_up", lambda self, length: None)  # compile only what the runs use
    assert bench.main(["--smoke", "--sections", "ours", "--timeline", "--decode-steps", "2",
                       "--out", str(tmp_path)]) == 0
    lines = [json.loads(line) for line in (tmp_path / "timeline.jsonl").read_text().splitlines()]
    summaries = [line for line in lines if line["event"] == "summary"]
    assert [s["concurrency"] for s in summaries] == [1, 2, 4]
    for s in summaries:
        assert s["decode_calls"] > 0 and sum(s["categories"].values()) <= s["wall"] + 1e-4
    assert {"prefill", "launch", "decode_wait", "request"} <= {line["event"] for line in lines}
    assert "timeline K=2, 4 clients" in capsys.readouterr().out.split("| engine K=2 | 4 |")[-1]


def test_warm_up_freezes_the_objects_alive_and_leaves_the_batcher_idle():
    """warm_up runs every group size's requests to the end, then collects and freezes what is alive (gc.freeze), so
    a full collector pass during serving skips the libraries' and the model's objects."""
    policy = policy_for("smoke")
    model = m1jax.M1ForCausalLM(SMOKE_CONFIG, policy=policy)
    batcher = Batcher(model, random_params(SMOKE_CONFIG, policy=policy), lambda ids: "", max_batch=2,
                      max_context=64, chunk_size=16, decode_steps=K, prefill_batch=2)
    gc.unfreeze()
    try:
        batcher.warm_up(PROMPT)
        assert gc.get_freeze_count() > 0
        assert batcher.busy_slots == 0 and batcher.queue_depth == 0
    finally:
        gc.unfreeze()
