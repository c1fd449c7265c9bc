"""The profiling and grid benchmark scripts on the CPU: the profile parser on a real compiled HLO and a GPU-shaped
trace, and the --smoke runs of decode_flags.py, grouped_matmul.py, grouped_matmul_decode.py, lightning_grid.py,
lightning_tiling.py, step_profile.py and head_precision.py."""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_step_hlo():
    """A compiled function with the scopes the categorizer reads: a layer matmul, an lm_head matmul, a loss."""
    def f(x, w, head):
        with jax.named_scope("groups"), jax.named_scope("attn"), jax.named_scope("qkv_proj"):
            h = jnp.tanh(x @ w)
        with jax.named_scope("lm_head"):
            logits = h @ head
        return jax.nn.logsumexp(logits, axis=-1).sum()

    args = (jnp.ones((64, 32)), jnp.ones((32, 32)), jnp.ones((32, 48)))
    return jax.jit(f).lower(*args).compile().as_text()


def test_hlo_index_and_categories():
    tp = load("train_profile")
    index = tp.HloIndex(small_step_hlo())
    assert index.instrs and index.frames  # instructions and the StackFrames table were read
    cats = {tp.categorize(index.describe(name), name) for name in index.instrs if index.describe(name)["is_matmul"]}
    assert "lm_head matmul" in cats and "matmul (layers)" in cats
    # the name fallback, with no HLO instruction known
    assert tp.categorize(None, "lightning_chunk_states") == "lightning attention"
    assert tp.categorize(None, "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNN") == "matmul (layers)"
    assert tp.categorize(None, "transposed_grouped_matmul") == "MoE grouped matmul"
    assert tp.categorize(None, "loop_add_fusion_3") == "other"


def test_analyse_gpu_shaped_trace():
    """Stream lines count, derived lines ('XLA Ops') do not; idle = wall - union of kernel intervals."""
    tp = load("train_profile")
    index = tp.HloIndex(small_step_hlo())
    dot = next(n for n in index.instrs if index.describe(n)["is_matmul"])
    meta = [{"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 7, "tid": 1, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
            {"ph": "M", "pid": 7, "tid": 2, "name": "thread_name", "args": {"name": "XLA Ops"}},
            {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}}]
    kernels = [{"ph": "X", "pid": 7, "tid": 1, "ts": 0.0, "dur": 400.0, "name": "nvjet_gemm",
                "args": {"hlo_op": dot, "name": "groups/attn/qkv_proj/dot_general"}},
               {"ph": "X", "pid": 7, "tid": 1, "ts": 500.0, "dur": 100.0, "name": "lightning_chunk_output",
                "args": {}},
               {"ph": "X", "pid": 7, "tid": 1, "ts": 700.0, "dur": 50.0, "name": "some_kernel",
                "args": {"name": "jit(step)/while/body/groups/layer_0/moe/moe_dispatch/gather"}},
               {"ph": "X", "pid": 7, "tid": 2, "ts": 0.0, "dur": 400.0, "name": dot},  # derived: not counted
               {"ph": "X", "pid": 1, "tid": 9, "ts": 0.0, "dur": 900.0, "name": "PjitFunction(step)"}]
    result = tp.analyse({"traceEvents": meta + kernels}, index, steps=1, wall_per_step_ms=1.0)
    assert result["num_events"] == 3
    per = result["per_step_ms"]
    assert per["lightning attention"] == pytest.approx(0.1)
    assert per["MoE routing/dispatch"] == pytest.approx(0.05)
    assert sum(per.values()) == pytest.approx(0.55)
    assert result["busy_ms"] == pytest.approx(0.55)
    assert result["matched_by"]["args.hlo_op"] == 1


@pytest.mark.slow
def test_decode_flags_smoke(tmp_path, monkeypatch):
    df = load("decode_flags")
    monkeypatch.setattr(df, "OUT", str(tmp_path))
    variants = ("default", "moe-gather", "moe-split-k2", "moe-two-calls", "moe-compare-sort")
    assert df.main(["--smoke", "--variants", ",".join(variants), "--flag-set", "bad=--xla_not_a_flag=1"]) == 1
    rows = {r["variant"]: r for r in map(json.loads, (tmp_path / "decode_flags.jsonl").read_text().splitlines())}
    assert all(rows[name]["ms_per_token"] > 0 for name in variants)
    assert "Unknown flag" in rows["bad"]["error"]  # a refused flag is reported, the rest still run


@pytest.mark.slow
def test_decode_flags_batch_smoke(tmp_path, monkeypatch, capsys):
    df = load("decode_flags")
    monkeypatch.setattr(df, "OUT", str(tmp_path))
    with pytest.raises(SystemExit):
        df.main(["--smoke", "--batch", "0"])
    assert "--batch must be >= 1" in capsys.readouterr().err
    assert df.main(["--smoke", "--synthetic", "--batch", "3", "--variants", "default,moe-argsort"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "decode_flags.jsonl").read_text().splitlines()]
    assert {r["variant"] for r in rows} == {"default", "moe-argsort"}
    assert all(r["batch"] == 3 and r["tokens_per_s"] == pytest.approx(3e3 / r["ms_per_token"]) for r in rows)
    assert "decode latency, batch 3" in capsys.readouterr().out


@pytest.mark.slow
def test_grouped_matmul_decode_smoke(tmp_path, monkeypatch, capsys):
    gd = load("grouped_matmul_decode")
    monkeypatch.setattr(gd, "OUT", str(tmp_path))
    assert gd.main(["--smoke"]) == 0  # every tiling agrees with the float32 reference
    rows = [json.loads(line) for line in (tmp_path / "grouped_matmul_decode.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["event"] == "time"]
    variants = 1 + gd.SMOKE["candidates"]
    assert len(timed) == 2 * variants and all(r["us"] > 0 and r["rel_err"] < 2e-2 for r in timed)
    assert "bytes-read floor" in capsys.readouterr().out


def run_smoke(name, tmp_path, monkeypatch, *args):
    """benchmarks/<name>.py --smoke [args] writing into tmp_path: (the module, the rows of its <name>.jsonl)."""
    module = load(name)
    monkeypatch.setattr(module, "OUT", str(tmp_path))
    module.main(["--smoke", *args])
    return module, [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_lightning_grid_smoke(tmp_path, monkeypatch, capsys):
    lg, rows = run_smoke("lightning_grid", tmp_path, monkeypatch)
    forward = [r for r in rows if "best" in r]
    assert len({tuple(r["shape"]) for r in forward}) == len(lg.SMOKE_GRID)
    for r in forward:
        assert set(r["ours_ms"]) == set(lg.candidates(tuple(r["shape"])))
        assert all(err < lg.MISMATCH for err in r["vs_shipped"].values())  # every tiling computes the same
    assert any("ours_fb_ms" in r for r in rows)
    assert "MIN FLA/ours" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("part", ["backward", "forward"])
def test_lightning_tiling_smoke(part, tmp_path, monkeypatch, capsys):
    lt, rows = run_smoke("lightning_tiling", tmp_path, monkeypatch, "--part", part)
    assert set(rows[0]["ms"]) == set(lt.CANDIDATES[part]) and not rows[0]["errors"]  # every candidate ran
    assert len(rows[1]["ms"]) == 4  # the default and the three fastest
    assert all(err < 1e-2 for row in rows for err in row["err"].values())  # every tiling computes the same
    assert "default" in capsys.readouterr().out


@pytest.mark.slow
def test_grouped_matmul_smoke(tmp_path, monkeypatch, capsys):
    """grouped_matmul.py --smoke --quick with named tilings: the device check passes, every candidate of every kernel
    (a Mosaic GPU tiling among them) computes what the first computes, and the sweep's table prints."""
    monkeypatch.setenv("OUT", str(tmp_path))  # read when the module loads
    gm = load("grouped_matmul")
    with pytest.raises(SystemExit) as done:
        gm.main(["--smoke", "--quick", "--widths", "smoke-wide", "--candidates",
                 "16x16x16/4/2,32x16x16/4/2,mosaic:64x64x64/2"])
    assert done.value.code == 0, gm.FAILURES
    rows = [json.loads(line) for line in (tmp_path / "grouped_matmul.jsonl").read_text().splitlines()]
    sweep = [r for r in rows if r["event"] == "sweep"]
    assert len(sweep) == 9 and all(r["rel_diff_vs_first"] < 1e-2 for r in sweep)  # 3 kernels x (2 Triton + Mosaic)
    assert [r["kernel"] for r in sweep if r["tiling"] == "mosaic:64x64x64/2"] == ["forward", "d_lhs", "d_rhs"]
    assert "tiling (uniform routing)" in capsys.readouterr().out
    for spec in ("16x64x128/4/4/2", "mosaic:128x128x64/4"):
        assert gm.tiling_spec(gm.parse_tiling(spec)) == spec
    with pytest.raises(SystemExit, match="not BMxBNxBK"):
        gm.parse_tiling("128x256/8/3")
    with pytest.raises(SystemExit, match="mosaic:BMxBNxBK/stages"):
        gm.parse_tiling("mosaic:128x128/4")


def test_head_precision_smoke(tmp_path, monkeypatch):
    """On the CPU every float32 variant multiplies in float32 (close to float64); the bf16 head is over 100x further."""
    hp = load("head_precision")
    monkeypatch.setattr(hp, "OUT", str(tmp_path))
    rows = {(r["variant"], r["scale"]): r for r in hp.main(["--smoke"])}
    assert set(rows) == {(v, s) for v in hp.VARIANTS for s in (1.0, 4.0)}
    for scale in (1.0, 4.0):
        assert rows[("float32-highest", scale)]["logprob_err_max"] < 1e-4
        assert rows[("bf16", scale)]["logprob_err_max"] > 100 * rows[("float32-highest", scale)]["logprob_err_max"]


@pytest.mark.slow
def test_step_profile_smoke(tmp_path, monkeypatch):
    """The static decode target (trace parsed into categories) and the engine's per-phase timing, tiny sizes."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # the module appends a GPU flag: undone after
    sp = load("step_profile")
    log = tmp_path / "step_profile.jsonl"
    monkeypatch.setattr(sp, "OUT", str(tmp_path))
    monkeypatch.setattr(sp, "LOG", str(log))
    assert sp.main(["--smoke", "--targets", "static,engine-phases"]) == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    phases = next(r for r in rows if r.get("what") == "scheduler phases")
    assert phases["tokens"] > 0 and phases["phases"]["_launch"]["calls"] > 0 and phases["mean_busy_slots"] > 0
    profile = next(r for r in rows if r.get("what") == "profile")
    assert profile["target"].startswith("static") and profile["profile"]["num_events"] > 0
