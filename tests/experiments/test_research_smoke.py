"""Issue 15's research scripts: the on-device MQAR / needle generators against a plain-Python reading of the rows,
and the CPU smoke runs of the hybrid ablation (with its length probe) and the scaling figure."""
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "experiments", "hybrid_ablation"))

import recall  # noqa: E402


def load(name, *parts):
    """An experiment script as a module under a unique name (several experiments have a run.py)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", *parts))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_row(tokens, graded, num_keys):
    """The slow twin: walk one row (T+1,) left to right as a dictionary would. Returns (pairs stored, answers
    expected at graded positions, positions of graded tokens)."""
    tokens = [int(t) for t in tokens]
    stored, position = {}, 0
    while position + 1 < len(tokens) and 1 <= tokens[position] <= num_keys and tokens[position + 1] > num_keys \
            and tokens[position] not in stored:
        stored[tokens[position]] = tokens[position + 1]
        position += 2
    expected = {}
    for i in range(position, len(tokens) - 1):
        if 1 <= tokens[i] <= num_keys:
            expected[i + 1] = stored.get(tokens[i])
    return stored, expected, [i for i, g in enumerate(graded) if g]


@pytest.mark.parametrize("seq_len,max_pairs,vocab", [(37, 9, 41), (101, 3, 9)])
def test_mqar_rows_recall_their_pairs(seq_len, max_pairs, vocab, seed, rng):
    batch = 8
    pairs = rng.integers(1, max_pairs + 1, size=batch).astype(np.int32)
    pairs[0] = max_pairs  # the fullest row: queries fill every free slot when 4 * max_pairs is near seq_len
    out = recall.mqar_batch(jax.random.key(seed), jnp.asarray(pairs), max_pairs, seq_len, vocab)
    inputs, targets, mask = (np.asarray(out[k]) for k in ("inputs", "targets", "mask"))
    assert inputs.shape == targets.shape == mask.shape == (batch, seq_len)
    num_keys = (vocab - 1) // 2
    for b in range(batch):
        tokens = np.concatenate([inputs[b], targets[b, -1:]])
        assert np.array_equal(tokens[1:], targets[b])
        graded = np.concatenate([[False], mask[b] > 0])
        stored, expected, graded_at = read_row(tokens, graded, num_keys)
        assert len(stored) == pairs[b]  # distinct keys, each with a value
        assert sorted(expected) == graded_at  # every query key, and nothing else, is graded
        assert len(graded_at) == pairs[b]
        assert all(expected[i] == tokens[i] for i in graded_at)  # the answer is the stored value
        asked = sorted(int(tokens[i - 1]) for i in graded_at)
        assert asked == sorted(stored)  # each stored key asked exactly once
        rest = np.delete(tokens, [2 * i for i in range(pairs[b])] + [2 * i + 1 for i in range(pairs[b])]
                         + graded_at + [i - 1 for i in graded_at])
        assert np.all(rest == recall.FILLER)


def test_hidden_answers_leave_only_what_key_matching_needs(seed, rng):
    """hide_answers: no graded answer is an input any more (the elimination shortcut: name the row's values not yet
    answered); the pairs, the query keys, the targets and the mask are untouched; needle rows pass through."""
    pairs = jnp.asarray(rng.integers(1, 9, size=6), jnp.int32)
    out = recall.mqar_batch(jax.random.key(seed), pairs, 8, 48, 41)
    hidden = recall.hide_answers(out)
    inputs, new, mask = np.asarray(out["inputs"]), np.asarray(hidden["inputs"]), np.asarray(out["mask"])
    answer_at = np.zeros_like(mask, bool)
    answer_at[:, 1:] = mask[:, :-1] > 0  # the input one after each graded position is its answer
    assert answer_at.sum() == mask.sum() - (mask[:, -1] > 0).sum()
    assert np.all(new[answer_at] == recall.FILLER)
    np.testing.assert_array_equal(new[~answer_at], inputs[~answer_at])
    for k in ("targets", "mask"):
        np.testing.assert_array_equal(hidden[k], out[k])
    needle = recall.needle_batch(jax.random.key(seed), 4, 40, 41)
    np.testing.assert_array_equal(recall.hide_answers(needle)["inputs"], needle["inputs"])


def test_mqar_layout_errors():
    with pytest.raises(ValueError, match="seq_len"):
        recall.mqar_batch(jax.random.key(0), jnp.ones((1,), jnp.int32), 9, 35, 64)
    with pytest.raises(ValueError, match="max_pairs"):
        recall.mqar_batch(jax.random.key(0), jnp.ones((1,), jnp.int32), 40, 200, 64)


def test_needle_rows(seed):
    seq_len, vocab = 50, 21
    out = recall.needle_batch(jax.random.key(seed), 16, seq_len, vocab)
    inputs, targets, mask = (np.asarray(out[k]) for k in ("inputs", "targets", "mask"))
    depth = np.asarray(out["depth"])
    for b in range(16):
        tokens = np.concatenate([inputs[b], targets[b, -1:]])
        assert depth[b] % 2 == 0 and 0 <= depth[b] <= seq_len - 4
        key, value = tokens[depth[b]], tokens[depth[b] + 1]
        assert 1 <= key <= 10 < value < vocab
        assert tokens[seq_len - 1] == key and tokens[seq_len] == value
        assert np.flatnonzero(mask[b]).tolist() == [seq_len - 1]
        assert np.count_nonzero(tokens) == 4


def test_schedule_and_arms():
    total, warmup = 1000.0, 100
    values = [float(recall.schedule(jnp.int32(s), total, warmup)) for s in (0, 99, 550, 1000, 5000)]
    assert values[0] == pytest.approx(0.01) and values[1] == pytest.approx(1.0)
    assert values[2] == pytest.approx(0.55, abs=1e-6) and values[3] == pytest.approx(0.1) == values[4]
    assert recall.Arm("1", 8, 1, 4, 32).layer_types == ("lightning",) * 7 + ("softmax",)
    assert recall.Arm("4", 8, 4, 4, 32).layer_types == ("lightning", "softmax") * 4
    assert recall.Arm("L", 8, 0, 2, 64).state_floats == 2 * 64 * 64
    assert recall.Arm("SL", 2, 1, 1, 64, pattern="SL").layer_types == ("softmax", "lightning")
    with pytest.raises(ValueError, match="one letter S or L for each of num_layers=2"):
        _ = recall.Arm("SLL", 2, 1, 1, 64, pattern="SLL").layer_types
    with pytest.raises(ValueError, match="softmax_layers"):
        _ = recall.Arm("3", 8, 3, 4, 32).layer_types


def test_hybrid_ablation_cpu_smoke(tmp_path):
    """One arm with both layer kinds through every step of the GPU run: population training with the step plan
    fitted to a budget, held-out recall per P, the length probe (MQAR spread + needle), then the report."""
    hybrid = load("hybrid_ablation_run", "hybrid_ablation", "run.py")
    path = hybrid.main(["--size", "cpu", "--out", str(tmp_path), "--arms", "1", "--steps", "4",
                        "--train-budget-s", "1e6"])
    rows = [json.loads(line) for line in open(path)]
    final = [r for r in rows if r["kind"] == "final"]
    lengths = [r for r in rows if r["kind"] == "length"]
    assert len(final) == 1 and final[0]["steps_done"] == 4 and not final[0]["cut_short"]
    assert set(final[0]["accuracy_by_pairs"]) == {"2", "4", "8"}
    assert all(len(v) == 2 for v in final[0]["accuracy_by_pairs"].values())  # 2 LRs x 1 seed
    assert [r["length"] for r in lengths] == [64]
    assert set(lengths[0]["accuracy_by_group"]) == {"mqar-P2", "mqar-P8", "mqar-P16", "needle"}  # 16: 2 x 8
    # a rerun resumes: the finished arm is skipped
    assert hybrid.main(["--size", "cpu", "--out", str(tmp_path), "--arms", "1"]) == path
    assert len(open(path).readlines()) == len(rows)
    results = tmp_path / "results"
    hybrid.main(["--report", path, "--results-dir", str(results)])
    summary = json.loads((results / "hybrid_ablation_cpu.json").read_text())
    assert summary["summary"]["1"]["best_lr"] in (1e-3, 3e-3)
    assert len(summary["summary"]["1"]["matched_keys_at"]) == 1  # one seed at the best rate
    assert (results / "hybrid_ablation_cpu.png").exists() and (results / "length_extrapolation_cpu.png").exists()


def test_hybrid_ablation_resumes_an_arm_cut_short_from_its_checkpoint(tmp_path):
    """An arm cut short by the deadline keeps its row and a checkpoint; the rerun resumes at that step and trains
    the same steps an uninterrupted run does (same losses), its row replacing the cut-short one; a rerun with
    another plan is refused, naming what changed."""
    import time
    hybrid = load("hybrid_ablation_run_resume", "hybrid_ablation", "run.py")
    argv = ["--size", "cpu", "--arms", "1", "--steps", "6"]
    whole = [json.loads(line) for line in open(hybrid.main([*argv, "--out", str(tmp_path / "whole")]))]
    size = hybrid.override(hybrid.SIZES["cpu"], ["steps=6"], None)
    path = str(tmp_path / "cut" / "hybrid_cpu.jsonl")
    os.makedirs(os.path.dirname(path))
    hybrid.run_arm(hybrid.make_arms(size, ["1"])["1"], size, path, deadline=time.perf_counter())
    cut = [json.loads(line) for line in open(path)]
    assert cut[0]["cut_short"] and cut[0]["steps_done"] == 2 and hybrid.done_arms(path) == set()
    with pytest.raises(SystemExit, match="another"):
        hybrid.main(["--size", "cpu", "--arms", "1", "--steps", "8", "--out", str(tmp_path / "cut")])
    hybrid.main([*argv, "--out", str(tmp_path / "cut")])
    rows = [json.loads(line) for line in open(path)]
    finals = [r for r in rows if r["kind"] == "final"]
    assert len(finals) == 1 and finals[0]["resumed_at"] == 2 and not finals[0]["cut_short"]
    assert [p["step"] for p in finals[0]["curve"]] == [2, 4, 6]
    resumed, uninterrupted = ([p["loss"] for p in row["curve"]] for row in (finals[0], whole[0]))
    np.testing.assert_allclose(resumed, uninterrupted, rtol=1e-5)
    assert len(rows) == len(whole) and hybrid.done_arms(path) == {"1"}
    assert not any(os.path.exists(f) for f in hybrid.checkpoint_files(path, "1"))


def test_length_probe_asks_for_more_pairs_while_the_row_and_the_keys_allow():
    hybrid = load("hybrid_ablation_run_probe", "hybrid_ablation", "run.py")
    assert hybrid.probe_pairs((4, 8, 16, 32), 128, 256) == (4, 32)  # 64 pairs need 256 tokens
    assert hybrid.probe_pairs((4, 8, 16, 32), 256, 256) == (4, 32, 64)
    assert hybrid.probe_pairs((4, 8, 16, 32), 1024, 256) == (4, 32, 64, 127)  # 127 keys in a vocab of 256
    assert hybrid.probe_pairs((5,), 4096, 64) == (5, 10, 20, 31)


def test_matched_keys_at_is_the_first_step_past_halfway_at_the_smallest_p():
    """Key matching counts once recall at the smallest P passes (1 + 1/P) / 2: the 1/P level of a model that only
    names one of the row's values never counts, however long it stays there."""
    report = load("hybrid_ablation_report", "hybrid_ablation", "report.py")
    curve = [{"step": 100, "loss": [5.0, 5.0]},  # no evaluation at this step
             {"step": 300, "accuracy": {"8": [0.9, 0.12], "4": [0.26, 0.25]}},
             {"step": 600, "accuracy": {"8": [0.9, 0.13], "4": [0.625, 0.27]}},  # 0.625 is the bar at P 4: not past
             {"step": 900, "accuracy": {"8": [0.9, 0.14], "4": [0.63, 0.99]}}]
    assert report.matched_keys_at(curve, 0) == 900 and report.matched_keys_at(curve, 1) == 900
    assert report.matched_keys_at(curve[:3], 0) is None
    assert report.matched_keys_at([{"step": 50, "accuracy": {"2": [0.76]}, "loss": [1.0]}], 0) == 50


def test_report_pools_populations_of_one_arm_and_counts_key_matching():
    """Rows of one arm, depth, step plan and training length from several calls (other seeds) pool into one group;
    another depth or length is its own group; each length row stays with the final row it follows; key matching is
    counted per rate."""
    report = load("hybrid_ablation_report_pool", "hybrid_ablation", "report.py")

    def final(arm, layers, lrs, seeds, p4, seq_len=64):  # P-4 recall per member at the one evaluation, step 100
        types = ["softmax"] * layers if arm == "8" else ["lightning"] * layers
        return {"kind": "final", "arm": arm, "layer_types": types, "heads": 1, "head_dim": 64,
                "state_floats": 0, "params": 1, "lrs": lrs, "seeds": seeds, "steps_done": 100,
                "steps_planned": 100, "cut_short": False, "train_seconds": 1.0,
                "recipe": {"warmup": 5, "seq_len": seq_len},
                "accuracy_by_pairs": {"4": p4, "8": [0.1] * len(lrs)},
                "curve": [{"step": 100, "loss": [1.0] * len(lrs), "accuracy": {"4": p4, "8": [0.1] * len(lrs)}}]}

    def length(arm, values):
        return {"kind": "length", "arm": arm, "length": 128, "train_length": 64,
                "accuracy_by_group": {"needle": values}}

    rows = [final("8", 8, [1e-3, 3e-3], [0, 0], [0.2, 0.9]), length("8", [0.0, 1.0]),
            final("8", 8, [3e-3, 3e-3], [1, 2], [0.3, 0.95]), length("8", [0.5, 0.75]),
            final("8", 2, [3e-3], [0], [0.99])]
    summary = report.summarize(rows)
    assert set(summary["arms"]) == {"8, 8 layers", "8, 2 layers"}
    pooled = summary["arms"]["8, 8 layers"]
    assert pooled["best_lr"] == 3e-3 and pooled["seeds"] == [0, 1, 2]
    assert pooled["accuracy_by_pairs"]["4"]["per_seed"] == [0.9, 0.3, 0.95]
    assert pooled["matched_keys_at"] == [100, None, 100]
    assert summary["lengths"]["8, 8 layers"]["128"]["needle"]["per_seed"] == [1.0, 0.5, 0.75]
    assert "8, 2 layers" not in summary["lengths"]  # its final row has no length row
    table = {(t["label"], t["lr"]): t for t in report.key_matching(rows)}
    assert table[("8, 8 layers", 3e-3)]["matched"] == 2
    assert table[("8, 8 layers", 3e-3)]["seeds"] == [0, 1, 2]
    assert table[("8, 8 layers", 1e-3)]["matched"] == 0
    assert table[("8, 2 layers", 3e-3)]["matched_keys_at"] == [100]
    assert set(report.summarize(rows[:4])["arms"]) == {"8"}  # one depth and plan: the plain arm name
    longer = report.summarize(rows[:4] + [final("8", 8, [3e-3], [3], [0.25], seq_len=256)])["arms"]
    assert set(longer) == {"8, T 64", "8, T 256"}
    assert longer["8, T 64"]["seeds"] == [0, 1, 2]
    split = report.summarize(rows[:4] + [dict(final("8", 8, [3e-3], [4], [0.25]), head_dim=32)])["arms"]
    assert set(split) == {"8, 1x64", "8, 1x32"}  # another head split is another population, never pooled
    conv = report.summarize(rows[:4] + [dict(final("8", 8, [3e-3], [4], [0.25]), short_conv=4)])["arms"]
    assert set(conv) == {"8, no conv", "8, conv 4"}  # a lightning convolution is another architecture
    # capacity: only members that matched keys count; a P counts over the populations whose probe asked for it
    probe = lambda groups: {"kind": "length", "arm": "SL", "length": 256, "train_length": 64,  # noqa: E731
                            "accuracy_by_group": groups}
    learned = report.capacity([final("SL", 2, [3e-3, 3e-3], [0, 1], [0.9, 0.2]),
                               probe({"mqar-P4": [0.8, 0.1], "mqar-P32": [0.5, 0.0]}),
                               final("SL", 2, [3e-3], [2], [0.95]), probe({"mqar-P4": [0.6]})])
    assert learned["SL"]["seeds"] == [0, 2] and learned["SL"]["members"] == 3
    assert learned["SL"]["recall"]["64"]["4"] == pytest.approx(0.925)
    assert learned["SL"]["recall"]["256"] == pytest.approx({"4": 0.7, "32": 0.5})
    assert set(report.probed_past_training(learned)) == {"SL"}  # 32 pairs past training's 8


def test_hybrid_ablation_recipe_overrides(tmp_path):
    """--recipe and --lrs replace the size's entries (recorded in the row), an S/L arm orders the layers as named;
    a bad key or value names the fix."""
    hybrid = load("hybrid_ablation_run_overrides", "hybrid_ablation", "run.py")
    path = hybrid.main(["--size", "cpu", "--out", str(tmp_path), "--arms", "SL", "--steps", "2",
                        "--recipe", "seq_len=16", "--recipe", "pair_choices=2+3", "--recipe", "vocab=32",
                        "--recipe", "width=16", "--recipe", "compute_dtype=bfloat16", "--recipe", "seeds=3",
                        "--lrs", "2e-3"])
    final = [json.loads(line) for line in open(path) if '"final"' in line][0]
    assert final["recipe"]["seq_len"] == 16 and tuple(final["recipe"]["pair_choices"]) == (2, 3)
    assert final["recipe"]["vocab"] == 32 and final["steps_done"] == 2 and set(final["lrs"]) == {2e-3}
    assert set(final["accuracy_by_pairs"]) == {"2", "3"}
    assert final["width"] == 16 and final["compute_dtype"] == "bfloat16" and final["seeds"] == [3]
    assert final["layer_types"] == ["softmax", "lightning"]  # arm "SL": the layers in the order named
    assert final["short_conv"] == 0
    path = hybrid.main(["--size", "cpu", "--out", str(tmp_path / "conv"), "--arms", "LL", "--steps", "2",
                        "--recipe", "seq_len=16", "--recipe", "pair_choices=2", "--recipe", "short_conv=3"])
    final = [json.loads(line) for line in open(path) if '"final"' in line][0]
    assert final["short_conv"] == 3 and final["layer_types"] == ["lightning", "lightning"]
    for bad, words in ((["--recipe", "seq_length=16"], "KEY one of"), (["--recipe", "pair_choices=4,8"], "joined by +"),
                       (["--recipe", "compute_dtype=fp8"], "float32 or bfloat16"),
                       (["--recipe", "num_layers=two"], "positive integer"),
                       (["--recipe", "short_conv=-1"], "width >= 0"),
                       (["--lrs", "fast"], "comma-separated numbers"), (["--arms", "L-D12"], "does not divide"),
                       (["--arms", "softmax"], "is not an arm"), (["--arms", "3"], "must divide"),
                       (["--arms", "SLS"], "one letter S or L")):
        with pytest.raises(SystemExit, match=words):
            hybrid.main(["--size", "cpu", "--out", str(tmp_path / "bad"), *bad])


def test_scaling_cpu_smoke(tmp_path):
    """The scaling script's op and whole-model timings at one tiny length each, then its report and figure."""
    scaling = load("scaling_run", "scaling", "run.py")
    path = scaling.main(["--size", "cpu", "--out", str(tmp_path), "--op-lengths", "64",
                         "--model-lengths", "64"])
    rows = [json.loads(line) for line in open(path)]
    ops = [r for r in rows if r["kind"] == "op"]
    models = [r for r in rows if r["kind"] == "model"]
    assert len(ops) == 1 and all(ops[0][k] > 0 for k in ("ours_fwd", "ours_fwdbwd", "softmax_fwd", "softmax_fwdbwd"))
    assert {r["schedule"] for r in models} == {"hybrid 7:1", "softmax only"}
    summary = scaling.main(["--report", path, "--results-dir", str(tmp_path / "results")])
    assert (tmp_path / "results" / "scaling_cpu.png").exists() and "softmax_longest_T" in summary


def test_crossover_interpolates_in_log_space():
    scaling = load("scaling_run_crossover", "scaling", "run.py")
    rows = [{"T": 1024, "a": 2.0, "b": 1.0}, {"T": 4096, "a": 2.0, "b": 4.0}]
    # log(b/a) goes from -log 2 to +log 2: zero halfway in log T, at 2048
    assert scaling.crossover(rows, "a", "b") == pytest.approx(2048.0)
    assert scaling.crossover(rows[1:], "a", "b") == "<4096"
    assert scaling.crossover(rows[:1], "a", "b") is None
