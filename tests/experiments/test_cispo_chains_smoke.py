"""Smoke test of experiments/cispo_long_chains: the checkpoint round trip and one RL step with its token statistics
(the --size cpu numbers cut further), the same for --task countdown, then the summaries, tables and plot on records of
every algorithm."""
import dataclasses
import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "experiments",
                    "cispo_long_chains")
sys.path.insert(0, HERE)


def load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, file))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


run = load("cispo_long_chains_run", "run.py")
analysis = load("cispo_long_chains_analysis", "chains_analysis.py")

SMOKE = dataclasses.replace(run.SIZES["cpu"], prompts=2, group=2, updates=2, max_new_tokens=16)


def test_checkpoint_round_trip_and_one_rl_step(tmp_path):
    """The pretraining loop and the mismatch are exercised by `run.py --size cpu` (minutes); here, in CI's budget:
    the .npz checkpoint round trip and one RL step of DAPO with its token statistics and exported lines."""
    import jax
    from m1jax.config import M1Config
    from m1jax.model import init_params

    config = M1Config(**SMOKE.model)
    params = init_params(config, jax.random.key(0))
    path = str(tmp_path / "policy.npz")
    run.save_policy(path, config, params)
    loaded_config, loaded = run.load_policy(path)
    assert loaded_config == config
    before, after = jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_flatten_with_path(loaded)[0]
    assert [k for k, _ in before] == [k for k, _ in after]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (_, a), (_, b) in zip(before, after))
    export = run.Export(str(tmp_path / "export"))
    rl = dataclasses.replace(SMOKE, eval_prompts=0)
    history = run.run_one(rl, (loaded_config, loaded), str(tmp_path / "dapo"), "dapo", 0, 1e-4, 1, 0, export,
                          "compare")
    assert len(history) == 1 and 0.0 <= history[0]["reward_mean"] <= 1.0 and "grad_norm_max" in history[0]
    with open(tmp_path / "export" / "tokens.jsonl") as f:
        tokens = [json.loads(line) for line in f]
    assert len(tokens) == 1 and tokens[0]["algo"] == "dapo"
    assert tokens[0]["counts"]["tokens"] == sum(v[0] for v in tokens[0]["by_role"].values())
    with open(tmp_path / "export" / "records.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1]


def test_countdown_rl_step_counts_fork_tokens(tmp_path):
    """--task countdown at the cpu size cut further: one RL step of CISPO on countdown prompts (the same shapes as the
    chains step above, so its compilations are reused), its clipped tokens counted by the fork roles; and the
    pretraining batches drawn ahead by a worker process equal those drawn in place."""
    import jax
    from m1jax.config import M1Config
    from m1jax.model import init_params
    from m1jax.tasks.countdown import TOKEN_ROLES
    from m1jax.train.data import TaskData

    size = dataclasses.replace(run.COUNTDOWN_SIZES["cpu"], eval_prompts=0)
    assert size.task == "countdown" and size.rl_task(0).max_prompt_len == 2 * SMOKE.max_digits + 2  # chains' width
    config = M1Config(**size.model)
    export = run.Export(str(tmp_path / "export"))
    history = run.run_one(size, (config, init_params(config, jax.random.key(0))), str(tmp_path / "cispo"), "cispo",
                          0, 1e-4, 1, 0, export, "compare")
    assert len(history) == 1 and 0.0 <= history[0]["reward_mean"] <= 1.0
    with open(tmp_path / "export" / "tokens.jsonl") as f:
        tokens = [json.loads(line) for line in f]
    assert list(tokens[0]["by_role"]) == list(TOKEN_ROLES)
    assert tokens[0]["counts"]["tokens"] == sum(v[0] for v in tokens[0]["by_role"].values())
    data = TaskData(size.pretrain_task(), 2, size.seq_len, seed=0)
    here, ahead = list(run.batches(data, 1, 3, 0)), list(run.batches(data, 1, 3, 1))
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(here, ahead, strict=True) for k in a)
    assert "countdown search traces" in size.describe()


def fake_records(rng, steps: int) -> list[dict]:
    rows = []
    for step in range(1, steps + 1):
        rows.append({"step": step, "reward_mean": float(rng.uniform()), "clip_high_frac": 0.01, "clip_low_frac": 0.02,
                     "dropped_frac": 0.005, "kept_groups_frac": 0.8, "mismatch_corr": 0.999, "grad_norm": 0.5,
                     "grad_norm_max": 0.9, "entropy_rollout": 0.3, "response_length": 80.0,
                     **({"eval_accuracy_initial": 0.4} if step == 1 else {}),
                     **({"eval_accuracy": float(rng.uniform())} if step % 2 == 0 or step == steps else {})})
    return rows


def fake_tokens(rng) -> dict:
    hist = rng.integers(0, 5, size=len(analysis._bins())).tolist()
    return {"counts": {"tokens": 100, "high": 4, "low": 3, "dropped": 2}, "high_positive": 2,
            "by_role": {role: [20, 1, 1, 0] for role in ("operand", "carry_decision", "sum", "separator", "answer")},
            "by_byte": {"+": [10, 2, 0, 1], "=": [10, 2, 3, 1]}, "prob_hist": {k: hist for k in
                                                                                ("tokens", "high", "low", "dropped")},
            "top_high": [{"context": "1+2", "token": "+", "role": "carry_decision", "old_prob": 0.01,
                          "ratio": float(rng.uniform(1.3, 3)), "advantage": 1.0}]}


def test_summary_tables_and_plot(tmp_path, rng):
    runs = {(a, s): fake_records(rng, 7) for a in run.ALGOS for s in (0, 1, 2)}
    tokens = [{"algo": a, "seed": s, "step": 1, **fake_tokens(rng)} for a, s in runs]
    summary = analysis.summarise(runs, tokens, run.ALGOS)
    dapo = [analysis.smoothed([r["reward_mean"] for r in runs[("dapo", s)]])[-1] for s in (0, 1, 2)]
    assert summary["dapo_final_level"] == pytest.approx(np.mean(dapo))
    pair = summary["paired"]["cispo - dapo"]["mean_reward"]
    expected = [np.mean([r["reward_mean"] for r in runs[("cispo", s)]]) - np.mean([r["reward_mean"]
                for r in runs[("dapo", s)]]) for s in (0, 1, 2)]
    assert pair["per_seed"] == pytest.approx(expected)
    assert summary["algorithms"]["grpo"]["tokens"]["counts"]["high"] == 12
    setup = {"mismatch": [{"engine": "e", "mismatch_corr": 0.99, "mismatch_max_gap": 0.1, "tokens": 5}],
             "pretrain": {"chosen": {"step": 1, "greedy_accuracy": 0.5, "sampled_accuracy": 0.3,
                                     "response_bytes": 80.0}, "params": 10}}
    args = types.SimpleNamespace(size="cpu", seeds=[0, 1, 2])
    stem = str(tmp_path / "out")
    analysis.write_results(stem, args, run.SIZES["cpu"], setup, {"cispo": 1e-4}, summary, runs, 1.0)
    with open(stem + ".json") as f:
        payload = json.load(f)
    assert set(payload["curves"]) == {f"{a}-seed{s}" for a, s in runs}
    text = open(stem + ".md").read()
    assert "| cispo - dapo |" in text and "carry_decision" in text
    assert os.path.getsize(stem + ".png") > 0


def test_steps_to_and_fitting_steps():
    assert analysis.steps_to(np.array([0.1, 0.2, 0.3]), 0.2) == 2 and analysis.steps_to(np.array([0.1]), 0.5) is None
    swept = {"step_seconds": [[20.0, 1.0, 1.0], [10.0, 1.0, 1.0]]}
    assert run.fitting_steps(swept, 9, 9 * (15.0 + 1.2 * 30), most=40) == 30
    assert run.fitting_steps(swept, 9, 1.0, most=40) == 5


def test_split_compare_then_report(tmp_path, capsys):
    """The runs of one comparison split over two --phase compare invocations (as over two GPUs or device calls),
    --task countdown --size cpu from an untrained checkpoint, then --phase report over both exports: the summary
    holds every algorithm and seed and equals the summary of the same runs read back from their run directories (what
    one --phase compare over all of them computes); a seed without every algorithm, or two different executions of
    one run, are refused. In-process, so the compilations of the tests above are reused."""
    import shutil
    import jax
    from m1jax.config import M1Config
    from m1jax.model import init_params

    merge = load("cispo_long_chains_merge", "merge.py")
    size = run.COUNTDOWN_SIZES["cpu"]
    config = M1Config(**size.model)
    run.save_policy(str(tmp_path / "pre.npz"), config, init_params(config, jax.random.key(0)))
    results, out = tmp_path / "results", tmp_path / "runs"
    results.mkdir()
    setup = {"size": "cpu", "sweep": {"chosen": {a: 1e-4 for a in run.ALGOS}},
             "mismatch": [{"engine": "e", "mismatch_corr": 0.99, "mismatch_max_gap": 0.1, "tokens": 5}],
             "pretrain": {"chosen": {"step": 1, "greedy_accuracy": 0.5, "sampled_accuracy": 0.3,
                                     "response_bytes": 80.0}, "params": 10}}
    (results / "cispo_countdown_cpu_setup.json").write_text(json.dumps(setup))
    common = ["--task", "countdown", "--size", "cpu", "--checkpoint", str(tmp_path / "pre.npz"), "--results",
              str(results), "--out", str(out)]  # 1 step per run, as above: their compiled CISPO and DAPO updates
    a, b = str(tmp_path / "gpu0"), str(tmp_path / "gpu1")
    run.main(common + ["--phase", "compare", "--runs", "dapo:0", "cispo:1", "cispo:0", "--export", a])
    run.main(common + ["--phase", "compare", "--algos", "grpo", "dapo", "--seeds", "1", "--export", b])
    assert (results / "cispo_countdown_cpu_part-cispo0-dapo0-cispo1.json").exists()  # a subset's own summary
    assert not (results / "cispo_countdown_cpu.json").exists()
    with pytest.raises(SystemExit) as refused:  # seed 0 lacks grpo
        run.main(common + ["--phase", "report", "--records", a, b])
    assert refused.value.code == 2 and "grpo seed 0" in capsys.readouterr().err
    run.main(common + ["--phase", "compare", "--runs", "grpo:0", "--export", str(tmp_path / "call2")])
    run.main(common + ["--phase", "report", "--records", a, b, str(tmp_path / "call2"), a])  # a twice: identical
    payload = json.loads((results / "cispo_countdown_cpu.json").read_text())
    assert payload["seeds"] == [0, 1] and set(payload["curves"]) == {f"{x}-seed{s}" for x in run.ALGOS for s in (0, 1)}
    assert all([r["seed"] for r in payload["summary"]["algorithms"][x]["per_seed"]] == [0, 1] for x in run.ALGOS)
    assert all(len(pair["mean_reward"]["per_seed"]) == 2 for pair in payload["summary"]["paired"].values())
    reference_runs, reference_tokens = {}, []
    for s in (0, 1):
        for x in run.ALGOS:
            with open(out / "countdown-cpu" / f"{x}-seed{s}" / "metrics.jsonl") as f:
                reference_runs[(x, s)] = [json.loads(line) for line in f]
    for x in run.ALGOS:
        for s in (0, 1):
            with open(out / "countdown-cpu" / f"{x}-seed{s}" / "tokens.jsonl") as f:
                reference_tokens += [{"algo": x, "seed": s, **json.loads(line)} for line in f]
    assert all(len(rows) == size.rl_steps for rows in reference_runs.values())
    reference = analysis.summarise(reference_runs, reference_tokens, run.ALGOS)
    assert payload["summary"] == json.loads(json.dumps(reference))
    merged = merge.collect([a, b, str(tmp_path / "call2")], "cispo_countdown_cpu_setup.json", run.ALGOS)
    assert merged["runs"] == reference_runs and merged["tokens"] == reference_tokens
    assert list(merged["runs"]) == [(x, s) for s in (0, 1) for x in run.ALGOS]  # seed-major, as compare
    changed = tmp_path / "rerun"  # another execution of b's runs, with other numbers
    shutil.copytree(b, changed)
    lines = (changed / "records.jsonl").read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), "reward_mean": 0.123})
    (changed / "records.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(merge.RecordsError, match="different records"):
        merge.collect([a, b, str(changed)], "cispo_countdown_cpu_setup.json", run.ALGOS)
    with pytest.raises(merge.RecordsError, match="--steps 3"):
        merge.collect([a, b, str(tmp_path / "call2")], "cispo_countdown_cpu_setup.json", run.ALGOS, steps=3)
    (changed / "events.jsonl").write_text("")  # as if the call had been cut before the runs' ends
    with pytest.raises(merge.RecordsError, match="dapo seed 1 in .* did not finish"):
        merge.collect([str(changed)], "cispo_countdown_cpu_setup.json", ("dapo", "grpo"))


def test_report_cuts_runs_to_their_first_steps(tmp_path):
    """--phase report --steps N compares every run's first N steps: a finished longer run is cut, and a run stopped
    by a call's time limit after N steps counts too (without token lines, said in a note); fewer steps refuse."""
    merge = load("cispo_long_chains_merge", "merge.py")
    export = tmp_path / "export"
    export.mkdir()
    tag = lambda algo, step: {"phase": "compare", "algo": algo, "seed": 0, "lr": 1e-4, "step": step}  # noqa: E731
    records = [{**tag("cispo", s), "reward_mean": s / 10, "step_seconds": 1.0} for s in (1, 2, 3)]
    records += [{**tag("dapo", s), "reward_mean": s / 20, "step_seconds": 2.0} for s in (1, 2, 3, 4)]  # stopped
    tokens = [{**tag("cispo", s), "counts": {"tokens": s}} for s in (1, 2, 3)]
    for name, lines in (("records", records), ("tokens", tokens),
                        ("events", [{"log": "timing", "algo": "cispo", "seed": 0, "seconds": 9.0}])):
        (export / f"{name}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(merge.RecordsError, match="dapo seed 0 in .* did not finish"):
        merge.collect([str(export)], "setup.json", ("cispo", "dapo"), chosen={"cispo": 1e-4, "dapo": 1e-4})
    merged = merge.collect([str(export)], "setup.json", ("cispo", "dapo"), steps=2,
                           chosen={"cispo": 1e-4, "dapo": 1e-4})
    assert all([r["step"] for r in merged["runs"][(algo, 0)]] == [1, 2] for algo in ("cispo", "dapo"))
    assert [t["step"] for t in merged["tokens"]] == [1, 2] and {t["algo"] for t in merged["tokens"]} == {"cispo"}
    assert merged["seconds"] == 2.0 + 4.0  # the kept steps' seconds of both runs
    assert any("without token lines" in note and "dapo seed 0" in note for note in merged["notes"])
    only = merge.collect([f"{export}=dapo"], "setup.json", ("dapo",), steps=2, chosen={"dapo": 1e-4})
    assert list(only["runs"]) == [("dapo", 0)] and only["tokens"] == []
    with pytest.raises(merge.RecordsError, match="fewer steps: cispo seed 0: 3"):
        merge.collect([str(export)], "setup.json", ("cispo", "dapo"), steps=4, chosen={"cispo": 1e-4, "dapo": 1e-4})


def test_lr_override_parses_algo_and_rate():
    assert run.algo_rate("cispo=1e-5") == ("cispo", 1e-5)
    for bad in ("cispo", "ppo=1e-5", "dapo=-1", "grpo=fast"):
        with pytest.raises(Exception, match="ALGO=RATE"):
            run.algo_rate(bad)
