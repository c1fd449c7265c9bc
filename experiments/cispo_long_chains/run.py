"""CISPO vs DAPO vs GRPO on long reasoning chains (issue 16), and the training-inference mismatch at this size.

MiniMax-M1 (section 3.1): in zero-RL, CISPO matched DAPO with half the steps and beat GRPO, because PPO-style
clipping drops the gradient of rare low-probability "fork" tokens whose ratio grows over 16 off-policy updates.
Here the responses are worked long additions (`m1jax.tasks.chains`, 40-130 bytes) whose fork is the carry
decision after each "x+y" ("+1" or "="), so the mechanism has room to act; or, with --task countdown, randomized
search traces of Countdown (`m1jax.tasks.countdown`, 50-500 bytes) that take wrong branches and back out, whose
forks (which numbers to combine next, when to give up a branch) are real choices.

    python experiments/cispo_long_chains/run.py --size cpu                      # every code path, ~10 min of compiling
    python experiments/cispo_long_chains/run.py --size gpu --phase pretrain --export DIR   # GPU call 1
    python experiments/cispo_long_chains/run.py --size gpu --phase compare --export DIR    # GPU call 2
    python experiments/cispo_long_chains/run.py --task countdown --size gpu --phase all --deadline 540 --export DIR
    python experiments/cispo_long_chains/run.py --task countdown --size gpu --phase compare --runs cispo:0 dapo:0 \
        --export DIR1                                       # a subset of the runs per process (one per GPU and call)
    python experiments/cispo_long_chains/run.py --task countdown --size gpu --phase report --records DIR1 DIR2 ...

Phase "pretrain": supervised training on worked chains of 1..max digits, stopped (or picked among its snapshots)
where the sampled accuracy on RL prompts is moderate (15-50%); the mismatch of a bf16 engine (bf16 and float32
lm_head) against the float32 trainer; an RL smoke that is also the learning-rate sweep (two rates per algorithm,
one seed apart from the comparison's). The checkpoint is one float32 .npz (model config inside).
Phase "compare": from that checkpoint, every algorithm with its swept rate, seeds paired (a seed gives every
algorithm the same prompts and the same first batch), the same generation batches, group size and 16 updates per
batch. Records (every step, tagged) and clipped-token summaries are appended to --export as they come.
Each (algorithm, seed) pair is one complete run in this process; --algos (with --seeds) or --runs ALGO:SEED picks
which, so that the 9 runs of a comparison can be spread over GPUs and device calls (a subset's own summary goes to
results/<stem>_part-<runs>.*). Phase "report": the results of the runs exported by several such invocations
(--records: their --export directories; `merge.py`), paired by seed, as one --phase compare over them writes them.
Results: experiments/results/cispo_long_chains[_cpu].{json,md,png}, with --task countdown cispo_countdown[_cpu].*
(or --results DIR).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from chains_analysis import summarise, write_results  # noqa: E402
from m1jax.config import M1Config, deepnorm_alpha, m1_schedule  # noqa: E402
from m1jax.inference.generate import generate  # noqa: E402
from m1jax.model import M1ForCausalLM  # noqa: E402
from m1jax.rl.rollout import NEWLINE_ID, RolloutConfig, collect_rollout, decode_completion, get_rl_task  # noqa: E402
from m1jax.rl.trainer import LossConfig, RLConfig, train_rl  # noqa: E402
from m1jax.tasks.chains import Chains, chain_consistent  # noqa: E402
from m1jax.tasks.countdown import Countdown, trace_consistent  # noqa: E402
from m1jax.tokenizer import ByteTokenizer  # noqa: E402
from m1jax.train.data import TaskData  # noqa: E402
from m1jax.train.optimizer import OptimizerConfig, make_optimizer  # noqa: E402
from m1jax.train.step import init_state, make_train_step  # noqa: E402

# name -> (loss, dynamic sampling): the three algorithms as published
VARIANTS = {"cispo": ("cispo", False), "dapo": ("dapo", True), "grpo": ("grpo", False)}
ALGOS = tuple(VARIANTS)
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(ROOT, "experiments", "results")
STEMS = {"chains": "cispo_long_chains", "countdown": "cispo_countdown"}  # results and checkpoint names by --task
CHECKPOINTS = {"chains": os.path.join(HERE, "checkpoint", "pretrained.npz"),  # ignored by git; carried to the GPU
               "countdown": os.path.join(HERE, "checkpoint", "pretrained_countdown.npz")}
SWEEP_SEED = 100  # the learning-rate sweep's prompts: apart from the comparison's seeds


@dataclasses.dataclass(frozen=True)
class Size:
    model: dict  # M1Config fields (a small M1: lightning/softmax hybrid, top-2 MoE)
    pretrain_steps: int
    pretrain_batch: int
    seq_len: int
    pretrain_lr: float
    pretrain_eval_every: int
    pretrain_seconds: float  # time box of the pretraining loop
    target_accuracy: tuple[float, float]  # sampled accuracy band to stop pretraining in
    rl_steps: int
    prompts: int
    group: int
    updates: int
    max_new_tokens: int
    sweep_lrs: tuple[float, ...]
    sweep_steps: int
    eval_prompts: int
    eval_every: int
    mismatch_prompts: int
    pretrain_digits: int = 0  # chains: pretraining chains have 1..pretrain_digits digits per operand
    min_digits: int = 0  # chains: RL prompts
    max_digits: int = 0
    countdown: dict | None = None  # countdown: Countdown's options, for pretraining and RL prompts alike
    data_workers: int = 0  # processes drawing pretraining batches ahead (countdown's search is Python: ~0.6 ms/trace)
    checkpoint_every: int = 0  # RL checkpoints every N batches, so that a longer --steps resumes (0: at the end)

    @property
    def task(self) -> str:
        return "chains" if self.countdown is None else "countdown"

    @property
    def task_options(self) -> dict:
        """The RL task's options (RLConfig.task_options)."""
        if self.countdown is None:
            return {"min_digits": self.min_digits, "max_digits": self.max_digits}
        return {k: v for k, v in self.countdown.items() if k != "keep_failed"}

    def rl_task(self, seed: int):
        return get_rl_task(self.task, seed=seed, **self.task_options)

    def pretrain_task(self):
        return Chains(1, self.pretrain_digits) if self.countdown is None else Countdown(**self.countdown)

    def consistent(self, completion: str, example: dict) -> bool:
        """The response's reasoning is right in full: the worked chain, or a well-formed search trace."""
        return (chain_consistent if self.countdown is None else trace_consistent)(completion, example["prompt"])

    def describe(self) -> str:
        if self.countdown is None:
            return f"long chains of {self.min_digits}-{self.max_digits} digits"
        t = self.pretrain_task()
        return (f"countdown search traces ({t.count} numbers in 1..{t.max_number}, targets {t.min_target}-"
                f"{t.max_target}, breadth {t.breadth}, temperature {t.temperature:g}, traces <= {t.max_len} bytes)")


def _model(hidden: int, layers: int, period: int, heads: int, head_dim: int, experts: int, expert_size: int) -> dict:
    alpha = deepnorm_alpha(layers)
    return dict(vocab_size=512, hidden_size=hidden, num_heads=heads, num_kv_heads=max(heads // 2, 1),
                head_dim=head_dim, num_experts=experts, experts_per_token=2, expert_size=expert_size,
                layer_types=m1_schedule(layers, period=period), rope_theta=10_000.0, rotary_dim=head_dim // 2,
                max_position_embeddings=8192, lightning_alpha=alpha, softmax_alpha=alpha,
                mlp_alpha=alpha)


SIZES = {
    # every code path of "gpu" with tiny numbers (2-3 digit chains, a 32-wide model): ~10 min on 2 busy CPU cores
    "cpu": Size(model=_model(32, 2, 2, 2, 16, 4, 32), pretrain_digits=3, pretrain_steps=12, pretrain_batch=8,
                seq_len=96, pretrain_lr=3e-3, pretrain_eval_every=6, pretrain_seconds=120.0,
                target_accuracy=(0.15, 0.5), min_digits=2, max_digits=3, rl_steps=3, prompts=4, group=4,
                updates=4, max_new_tokens=32, sweep_lrs=(1e-4, 3e-4), sweep_steps=2, eval_prompts=8, eval_every=2,
                mismatch_prompts=4),
    # one H200: ~2M parameters (128 wide, 4 layers at 1:1 lightning/softmax, 8 experts top-2), chains of 5-12 digits
    # (46-123 bytes), 32 prompts x 16 samples, 16 updates of 32 responses per batch
    "gpu": Size(model=_model(128, 4, 2, 4, 32, 8, 128), pretrain_digits=12, pretrain_steps=6000, pretrain_batch=64,
                seq_len=512, pretrain_lr=2e-3, pretrain_eval_every=250, pretrain_seconds=150.0,
                target_accuracy=(0.15, 0.5), min_digits=5, max_digits=12, rl_steps=50, prompts=32, group=16,
                updates=16, max_new_tokens=230, sweep_lrs=(1e-4, 3e-4), sweep_steps=4, eval_prompts=256,
                eval_every=10, mismatch_prompts=64),
    # round 2 (issue 16's "what is left"): a less-trained start (sampled accuracy ~20%, so carries are still
    # uncertain forks), a sweep that reaches down to 1e-5, and up to 50 generation batches per run
    "gpu2": Size(model=_model(128, 4, 2, 4, 32, 8, 128), pretrain_digits=12, pretrain_steps=6000, pretrain_batch=64,
                 seq_len=512, pretrain_lr=2e-3, pretrain_eval_every=125, pretrain_seconds=150.0,
                 target_accuracy=(0.10, 0.30), min_digits=5, max_digits=12, rl_steps=50, prompts=32, group=16,
                 updates=16, max_new_tokens=230, sweep_lrs=(1e-5, 3e-5, 1e-4), sweep_steps=4, eval_prompts=256,
                 eval_every=10, mismatch_prompts=64),
}

COUNTDOWN = dict(count=4, max_number=20, min_target=10, max_target=100, breadth=2, temperature=0.1)
COUNTDOWN_SIZES = {  # --task countdown
    # the code paths of "gpu" with tiny numbers: 3 numbers in 1..9 (prompts "9,9,9>9:" as wide as chains' cpu ones)
    "cpu": Size(model=_model(32, 2, 2, 2, 16, 4, 32), pretrain_steps=4, pretrain_batch=4, seq_len=96,
                pretrain_lr=3e-3, pretrain_eval_every=4, pretrain_seconds=30.0, target_accuracy=(0.15, 0.5),
                rl_steps=1, prompts=2, group=2, updates=2, max_new_tokens=16, sweep_lrs=(1e-4,), sweep_steps=1,
                eval_prompts=2, eval_every=1, mismatch_prompts=2,
                countdown=dict(count=3, max_number=9, min_target=1, max_target=9, max_len=88)),
    # one H200: 3.8M parameters (192 wide, 6 layers with 1 softmax every 3, 4 experts of 192 top-2; its .npz, 14.6
    # MiB, fits a device call's 16 MiB file limit); 4 numbers in 1..20, targets 10-100, traces of 51-496 bytes (prompt
    # 16 + 496 new tokens = 512 columns, a power of two for the Pallas kernels); 32 prompts x 16 samples and 16
    # updates per batch; 150 batches planned, cut by --deadline and resumed from checkpoints by a longer --steps
    "gpu": Size(model=_model(192, 6, 3, 6, 32, 4, 192), pretrain_steps=20000, pretrain_batch=64, seq_len=1024,
                pretrain_lr=2e-3, pretrain_eval_every=250, pretrain_seconds=210.0, target_accuracy=(0.15, 0.5),
                rl_steps=150, prompts=32, group=16, updates=16, max_new_tokens=496, sweep_lrs=(1e-5, 3e-5, 1e-4),
                sweep_steps=4, eval_prompts=128, eval_every=10, mismatch_prompts=16, checkpoint_every=10,
                countdown=dict(COUNTDOWN, max_len=496), data_workers=12),
}


class Export:
    """Appends tagged JSON lines to DIR/<name>.jsonl as results come (DIR: the device call's $OUT)."""

    def __init__(self, directory: str | None):
        self.directory = directory
        if directory:
            os.makedirs(directory, exist_ok=True)

    def write(self, name: str, record: dict, show: tuple[str, ...] | None = None) -> None:
        if show is None or show:
            shown = record if show is None else {k: record.get(k) for k in show}
            print(json.dumps({"log": name, **shown}, default=float), flush=True)
        if self.directory:  # records and tokens in files of their own, the rest in events.jsonl
            file = name if name in ("records", "tokens") else "events"
            with open(os.path.join(self.directory, file + ".jsonl"), "a") as f:
                f.write(json.dumps({"log": name, **record} if file == "events" else record, default=float) + "\n")


# ------------------------------------------------------------------------------------------------ checkpoint
def save_policy(path: str, config: M1Config, params) -> None:
    from flax import traverse_util
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, __config__=np.array(json.dumps(config.to_hf())),
             **{k: np.asarray(v, np.float32) for k, v in flat.items()})


def load_policy(path: str) -> tuple[M1Config, dict]:
    from flax import traverse_util
    with np.load(path) as data:
        config = M1Config.from_hf(json.loads(str(data["__config__"])))
        flat = {k: jnp.asarray(data[k]) for k in data.files if k != "__config__"}
    return config, traverse_util.unflatten_dict(flat, sep="/")


# ------------------------------------------------------------------------------------------------ pretraining
def sampled_accuracy(model, params, task, count: int, max_new_tokens: int, temperature: float, seed: int = 0,
                     consistent=lambda text, example: chain_consistent(text, example["prompt"])):
    """(accuracy, consistent-chain fraction, mean response bytes) of one sample per held-out prompt."""
    tokenizer = ByteTokenizer()
    examples = dataclasses.replace(task, seed=task.seed + 1_000_003).examples(0, count)
    out = generate(model, params, [tokenizer.encode(e["prompt"]) for e in examples], max_new_tokens=max_new_tokens,
                   temperature=temperature, seed=seed, stop_ids=(NEWLINE_ID, tokenizer.eos_id),
                   pad_id=tokenizer.pad_id)
    texts = [decode_completion(tokenizer, c) for c in out.completions]
    correct = [task.is_correct(t, e) for t, e in zip(texts, examples)]
    chains = [consistent(t, e) for t, e in zip(texts, examples)]
    return float(np.mean(correct)), float(np.mean(chains)), float(np.mean([len(t) for t in texts]))


def batches(data: TaskData, first: int, last: int, workers: int):
    """data.batch(step) for steps first..last, drawn by `workers` processes up to 2 * workers steps ahead (0: drawn
    here, one at a time). Leaving the loop early cancels what is still queued."""
    if not workers:
        yield from (data.batch(step) for step in range(first, last + 1))
        return
    import collections
    import concurrent.futures
    import multiprocessing
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        queued = collections.deque(pool.submit(data.batch, s) for s in range(first, min(first + 2 * workers, last + 1)))
        upcoming = first + len(queued)
        while queued:
            batch = queued.popleft().result()
            if upcoming <= last:
                queued.append(pool.submit(data.batch, upcoming))
                upcoming += 1
            yield batch
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def pretrain(size: Size, export: Export) -> tuple[M1Config, dict, dict]:
    """Supervised chains (or search traces) until the sampled accuracy on RL prompts enters the target band (or the
    time box ends); returns (config, params, summary) of the snapshot whose sampled accuracy is nearest the band's
    middle."""
    config = M1Config(**size.model)
    model = M1ForCausalLM(config)
    warmup = min(100, size.pretrain_steps // 4)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=size.pretrain_lr, warmup_steps=warmup,
                                               total_steps=size.pretrain_steps, schedule="constant", weight_decay=0.0))
    state = jax.jit(lambda: init_state(model, optimizer, 0))()
    step_fn = make_train_step(model, optimizer)
    data = TaskData(size.pretrain_task(), size.pretrain_batch, size.seq_len, seed=0)
    task = size.rl_task(0)
    low, high = size.target_accuracy
    begin, snapshots = time.perf_counter(), []
    params_count = sum(x.size for x in jax.tree.leaves(state.params))
    for step, batch in enumerate(batches(data, 1, size.pretrain_steps, size.data_workers), start=1):
        state, metrics = step_fn(state, {k: jnp.asarray(v) for k, v in batch.items()})
        last = step == size.pretrain_steps or time.perf_counter() - begin > size.pretrain_seconds
        if step % size.pretrain_eval_every and not last:
            continue
        greedy, _, _ = sampled_accuracy(model, state.params, task, size.eval_prompts, size.max_new_tokens, 0.0,
                                        consistent=size.consistent)
        sampled, consistent, length = sampled_accuracy(model, state.params, task, size.eval_prompts,
                                                       size.max_new_tokens, 1.0, consistent=size.consistent)
        record = {"step": step, "loss": float(metrics["loss"]), "greedy_accuracy": greedy,
                  "sampled_accuracy": sampled, "sampled_consistent_chain": consistent, "response_bytes": length,
                  "seconds": time.perf_counter() - begin, "params": int(params_count)}
        export.write("pretrain", record)
        snapshots.append((record, jax.device_get(state.params)))
        if sampled >= (low + high) / 2 or last:
            break
    in_band = [s for s in snapshots if low <= s[0]["sampled_accuracy"] <= high]
    record, params = min(in_band or snapshots[-1:], key=lambda s: abs(s[0]["sampled_accuracy"] - (low + high) / 2))
    return config, params, {"chosen": record, "snapshots": [s[0] for s in snapshots], "params": int(params_count)}


ENGINES = (("float32 engine (control)", "float32", True), ("bfloat16 engine, bf16 lm_head", "bfloat16", False),
           ("bfloat16 engine, float32 lm_head", "bfloat16", True))


def measure_mismatch(config: M1Config, params, size: Size, engines=ENGINES) -> list[dict]:
    """Token probabilities of a bfloat16 engine (bf16 or float32 lm_head; float32 as the control) against the
    float32 trainer, on sampled responses of the pretrained model."""
    model = M1ForCausalLM(config)  # the trainer: the default run policy, float32 throughout
    task = size.rl_task(12345)
    rows = []
    for name, dtype, head in engines:
        rollout = collect_rollout(model, params, task.examples(0, size.mismatch_prompts), seed=7,
                                  prompt_width=task.max_prompt_len, reward_fn=task.reward_fn,
                                  config=RolloutConfig(group_size=size.group, max_new_tokens=size.max_new_tokens,
                                                       sampler_compute_dtype=dtype, sampler_float32_lm_head=head))
        rows.append({"engine": name, **rollout.mismatch, "tokens": int(rollout.response_mask.sum())})
    return rows


# ------------------------------------------------------------------------------------------------ RL
def rl_config(size: Size, out: str, variant: str, seed: int, lr: float, steps: int, eval_every: int) -> RLConfig:
    algo, dynamic_sampling = VARIANTS[variant]
    return RLConfig(
        out=out, task=size.task, task_options=size.task_options,
        steps=steps, prompts_per_step=size.prompts, updates_per_batch=size.updates, seed=seed,
        rollout=RolloutConfig(group_size=size.group, max_new_tokens=size.max_new_tokens,
                              sampler_compute_dtype="bfloat16", sampler_float32_lm_head=True),
        loss=LossConfig(algo=algo), dynamic_sampling=dynamic_sampling,  # GRPO with its paper's KL (beta 0.04)
        optimizer=OptimizerConfig(learning_rate=lr, warmup_steps=0, schedule="constant", eps=1e-15, weight_decay=0.0),
        eval_prompts=size.eval_prompts, eval_every=eval_every, checkpoint_every=size.checkpoint_every or steps,
        progress=False,
        token_stats=True)


def run_one(size: Size, policy, out: str, variant: str, seed: int, lr: float, steps: int, eval_every: int,
            export: Export, phase: str) -> list[dict]:
    tags = {"phase": phase, "algo": variant, "seed": seed, "lr": lr}
    cfg = rl_config(size, out, variant, seed, lr, steps, eval_every)
    show = ("phase", "algo", "seed", "step", "reward_mean", "eval_accuracy", "clip_high_frac", "dropped_frac",
            "entropy_rollout", "response_length", "grad_norm", "step_seconds", "rollout_seconds")
    train_rl(cfg, policy=policy, callback=lambda step, record: export.write("records", {**tags, **record}, show))
    with open(os.path.join(out, "tokens.jsonl")) as f:
        for line in f:
            export.write("tokens", {**tags, **json.loads(line)}, show=())
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def sweep(size: Size, policy, out: str, export: Export, lrs=None, before: dict | None = None) -> dict:
    """Each algorithm at each of `lrs` (default size.sweep_lrs) for sweep_steps batches on SWEEP_SEED; the rate with
    the highest mean training reward over the second half wins (ties: the smaller rate). before: an earlier sweep's
    result, whose rates join the comparison (a sweep grown by a later call)."""
    chosen, table, timing = {}, {}, list(before["step_seconds"]) if before else []
    for variant in ALGOS:
        scores = {float(k): v for k, v in before["second_half_reward"][variant].items()} if before else {}
        for lr in lrs or size.sweep_lrs:
            history = run_one(size, policy, os.path.join(out, f"sweep-{variant}-lr{lr:g}"), variant, SWEEP_SEED, lr,
                              size.sweep_steps, 0, export, "sweep")
            timing.append([r["step_seconds"] for r in history])
            half = history[len(history) // 2:]
            scores[lr] = float(np.mean([r["reward_mean"] for r in half]))
        table[variant] = {f"{lr:g}": v for lr, v in scores.items()}
        chosen[variant] = max(sorted(scores), key=lambda lr: scores[lr])
    return {"chosen": chosen, "second_half_reward": table, "steps": size.sweep_steps, "seed": SWEEP_SEED,
            "step_seconds": timing}


def fitting_steps(swept: dict, runs: int, seconds_left: float, most: int) -> int:
    """RL steps per run that fit `runs` runs into seconds_left, from the sweep's timings: a run costs its first
    step (compilation) plus 1.2x the median later step per step (evaluation and slack); at least 5."""
    first = float(np.median([t[0] for t in swept["step_seconds"]]))
    later = float(np.median([x for t in swept["step_seconds"] for x in t[1:]]))
    return int(max(5, min(most, (seconds_left / runs - first) / (1.2 * later))))


def run_pair(text: str) -> tuple[str, int]:
    """--runs ALGO:SEED."""
    algo, _, seed = text.partition(":")
    if algo not in VARIANTS or not seed.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected ALGO:SEED with ALGO one of {', '.join(ALGOS)}")
    return algo, int(seed)


def algo_rate(text: str) -> tuple[str, float]:
    """--lr ALGO=RATE."""
    algo, _, rate = text.partition("=")
    try:
        value = float(rate)
    except ValueError:
        value = 0.0
    if algo not in VARIANTS or not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ALGO=RATE with ALGO one of {', '.join(ALGOS)}, RATE > 0")
    return algo, value


def selected(args) -> list[tuple[str, int]]:
    """The (algo, seed) runs of this invocation, seed-major (a cut invocation still leaves paired seeds)."""
    pairs = set(args.runs) if args.runs else {(a, s) for a in args.algos or ALGOS for s in args.seeds or [0, 1, 2]}
    return sorted(pairs, key=lambda p: (p[1], ALGOS.index(p[0])))


def sha256(path: str) -> str:
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def report(stem: str, args, size: Size, setup: dict, lrs: dict, runs: dict, tokens: list[dict], seconds: float):
    """summarise and write_results (results/<stem>.{json,md,png}), copied to --export."""
    summary = summarise(runs, tokens, ALGOS)
    write_results(stem, args, size, setup, lrs, summary, runs, seconds)
    if args.export and os.path.abspath(args.export) != os.path.abspath(os.path.dirname(stem)):
        for ext in (".json", ".md", ".png"):
            if os.path.exists(stem + ext):
                shutil.copy(stem + ext, os.path.join(args.export, os.path.basename(stem + ext)))
    return summary


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(STEMS), default="chains",
                        help="chains: worked long additions; countdown: search traces (sizes in COUNTDOWN_SIZES)")
    parser.add_argument("--size", choices=sorted(set(SIZES) | set(COUNTDOWN_SIZES)), default="cpu")
    parser.add_argument("--phase", choices=("pretrain", "compare", "all", "rl", "report"), default="all",
                        help="rl: all but the pretraining (the checkpoint and results/<stem>_pretrain.jsonl exist); "
                             "report: the results from the exports in --records (no device work)")
    parser.add_argument("--algos", choices=ALGOS, nargs="+", default=None,
                        help="the algorithms to run (default: all three), each with each of --seeds; every (algo, "
                             "seed) pair is one complete run in this process. With --phase report: the algorithms "
                             "every seed must have (default: all three)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="default 0 1 2; with --phase report, every seed found in --records")
    parser.add_argument("--runs", type=run_pair, nargs="+", default=None, metavar="ALGO:SEED",
                        help="instead of --algos x --seeds: exactly these runs (e.g. cispo:0 dapo:0 on GPU 0, grpo:0 "
                             "cispo:1 on GPU 1), each one complete run, in seed-major order")
    parser.add_argument("--records", nargs="+", default=None, metavar="DIR",
                        help="with --phase report: former --export directories of --phase compare (records.jsonl, "
                             "tokens.jsonl, events.jsonl, the setup), of any invocations and device calls; DIR=A+B "
                             "reads only algorithms A and B from DIR")
    parser.add_argument("--steps", type=int, default=None, help="RL steps per run (default: the size's); with "
                        "--phase report, compare every run's first STEPS steps (a run stopped after them counts too, "
                        "without its token lines; default: whole runs)")
    parser.add_argument("--lr", type=algo_rate, nargs="+", default=None, metavar="ALGO=RATE",
                        help="with --phase compare: run ALGO at RATE instead of the sweep's choice (a diagnostic "
                             "outside the swept comparison; every record carries its rate)")
    parser.add_argument("--out", default=os.path.join("runs", "cispo_long_chains"))
    parser.add_argument("--export", default=None, help="also append raw JSON lines here (a device call's $OUT)")
    parser.add_argument("--results", default=RESULTS)
    parser.add_argument("--sweep-more", type=float, nargs="*", default=None,
                        help="with --phase compare: sweep these rates too before comparing (the setup is updated)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds for the whole invocation: with --phase all, cut the RL steps to fit")
    parser.add_argument("--checkpoint", default=None,
                        help="the pretrained .npz (default: CHECKPOINTS[task] for --size gpu, else under --out)")
    args = parser.parse_args(argv)
    sizes = SIZES if args.task == "chains" else COUNTDOWN_SIZES
    if args.size not in sizes:
        parser.error(f"--size {args.size} is not defined for --task {args.task}; choose one of {sorted(sizes)}")
    if args.runs and (args.algos or args.seeds):
        parser.error("--runs names the runs itself: leave out --algos and --seeds")
    if (args.phase == "report") != bool(args.records):
        parser.error("--records goes with --phase report, and --phase report needs --records")
    size = sizes[args.size]
    out = os.path.join(args.out, args.size if args.task == "chains" else f"{args.task}-{args.size}")
    steps = args.steps or size.rl_steps
    export = Export(args.export)
    checkpoint = args.checkpoint or (CHECKPOINTS[args.task] if args.size == "gpu"
                                     else os.path.join(out, "pretrained.npz"))
    stem = os.path.join(args.results, STEMS[args.task] + ("" if args.size == "gpu" else f"_{args.size}"))
    setup_path = stem + "_setup.json"
    if args.phase == "report":
        from merge import RecordsError, collect
        local = None
        if os.path.exists(setup_path):  # used only when no directory holds the setup (exports of older versions)
            with open(setup_path) as f:
                local = json.load(f)
        algos = [a for a in ALGOS if a in (args.algos or ALGOS)]  # in ALGOS' order, as --phase compare
        seeds = sorted(set(args.seeds)) if args.seeds else None
        try:
            merged = collect(args.records, os.path.basename(setup_path), algos, seeds, args.steps,
                             local and local["sweep"]["chosen"])
            if not (merged["setup"] or local):
                raise RecordsError(f"no {os.path.basename(setup_path)} in {' '.join(args.records)} nor {setup_path}")
        except RecordsError as error:
            parser.exit(2, f"{parser.prog}: no report: {error}\n")
        setup = merged["setup"] or local
        for note in merged["notes"]:
            print(f"note: {note}", file=sys.stderr, flush=True)
        args.seeds = merged["seeds"]
        report(stem, args, size, setup, merged["lrs"], merged["runs"], merged["tokens"], merged["seconds"])
        return
    pairs = selected(args)
    args.seeds = sorted({s for _, s in pairs})
    start = time.perf_counter()
    print(json.dumps({"devices": [str(d) for d in jax.devices()], "task": args.task, "size": args.size,
                      "phase": args.phase, "runs": pairs}), flush=True)
    if args.phase in ("pretrain", "all", "rl"):
        if args.phase == "rl":
            config, params = load_policy(checkpoint)
            with open(os.path.join(RESULTS, STEMS[args.task] + "_pretrain.jsonl")) as f:  # the GPU pretraining's
                snapshots = [json.loads(line) for line in f if line.strip()]
            pre = {"chosen": snapshots[-1], "snapshots": snapshots, "params": snapshots[-1]["params"]}
        else:
            config, params, pre = pretrain(size, export)
            save_policy(checkpoint, config, params)
            if args.export:
                shutil.copy(checkpoint, os.path.join(args.export, "pretrained.npz"))
        mismatch = measure_mismatch(config, params, size)
        for row in mismatch:
            export.write("mismatch", row)
        policy = (config, params)
        begin = time.perf_counter()
        swept = sweep(size, policy, out, export)
        swept["seconds"] = time.perf_counter() - begin
        setup = {"size": args.size, "settings": dataclasses.asdict(size), "pretrain": pre, "mismatch": mismatch,
                 "sweep": swept, "devices": [d.device_kind for d in jax.devices()]}
        os.makedirs(args.results, exist_ok=True)
        with open(setup_path, "w") as f:
            json.dump(setup, f, indent=1)
        if args.export and os.path.abspath(args.export) != os.path.abspath(args.results):
            shutil.copy(setup_path, os.path.join(args.export, os.path.basename(setup_path)))
        print(json.dumps({"pretrain_chosen": pre["chosen"], "sweep": swept}), flush=True)
    if args.phase in ("compare", "all", "rl"):
        with open(setup_path) as f:
            setup = json.load(f)
        policy = load_policy(checkpoint)
        if args.sweep_more:
            begin = time.perf_counter()
            setup["sweep"] = sweep(size, policy, out, export, args.sweep_more, setup["sweep"])
            setup["sweep"]["seconds_more"] = time.perf_counter() - begin
            with open(setup_path, "w") as f:
                json.dump(setup, f, indent=1)
            export.write("sweep", setup["sweep"])
        if args.export and os.path.abspath(args.export) != os.path.abspath(args.results):  # --phase report's input
            shutil.copy(setup_path, os.path.join(args.export, os.path.basename(setup_path)))
        lrs = {k: float(v) for k, v in setup["sweep"]["chosen"].items()} | dict(args.lr or [])
        if args.deadline and not args.steps and "step_seconds" in setup["sweep"]:
            left = args.deadline - (time.perf_counter() - start) - 30.0
            steps = fitting_steps(setup["sweep"], len(pairs), left, size.rl_steps)
            export.write("plan", {"steps": steps, "seconds_left": left})
        export.write("compare", {"task": args.task, "size": args.size, "runs": pairs, "steps": steps, "lrs": lrs,
                                 "checkpoint_sha256": sha256(checkpoint)})
        runs = {}
        for variant, seed in pairs:  # seed-major: a cut run still leaves paired seeds
            begin = time.perf_counter()
            runs[(variant, seed)] = run_one(size, policy, os.path.join(out, f"{variant}-seed{seed}"), variant,
                                            seed, lrs[variant], steps, size.eval_every, export, "compare")
            export.write("timing", {"algo": variant, "seed": seed, "seconds": time.perf_counter() - begin})
        tokens = []
        for variant, seed in sorted(pairs, key=lambda p: (ALGOS.index(p[0]), p[1])):
            with open(os.path.join(out, f"{variant}-seed{seed}", "tokens.jsonl")) as f:
                tokens += [{"algo": variant, "seed": seed, **json.loads(line)} for line in f]
        if args.runs or args.algos:  # a subset: its own summary, apart from the comparison's results
            stem += "_part-" + "-".join(f"{a}{s}" for a, s in pairs)
            stem += "".join(f"_{a}-lr{r:g}" for a, r in args.lr or [])
        report(stem, args, size, setup, lrs, runs, tokens, time.perf_counter() - start)


if __name__ == "__main__":
    main()
