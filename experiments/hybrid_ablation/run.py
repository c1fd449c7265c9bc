"""The hybrid ablation that binds the lightning state, with the length-extrapolation probe in the same run.

    python experiments/hybrid_ablation/run.py --size cpu|gpu [--out DIR] [--arms 0,1,8] [--deadline-s 480]
    python experiments/hybrid_ablation/run.py --report DIR/hybrid_gpu.jsonl     # summaries + figures
    python experiments/hybrid_ablation/run.py --size gpu --arms 8 --recipe seq_len=64 --recipe pair_choices=4 \
        --lrs 3e-3 --out DIR2    # a control: the size with recipe entries and rates replaced (recorded per row)

Arms (same width, vocab, MLP, norms): 8 layers with 0, 1 (M1's 7:1), 2, 4, 8 softmax layers, and lightning-only
at a second head dim (state H*D*D); any other order as letters, one per layer (S softmax, L lightning: "SL"
puts softmax under lightning). Every arm trains a population of learning rates x seeds in one compiled loop
(recall.Population) on MQAR with P pairs drawn per row (Zoology's regime: T=128, P in {4, 8, 16, 32}, 127 keys),
then is evaluated at the training length per P, and at 2x..32x that length (MQAR with the same pairs spread over
the row, and a needle) for the extrapolation probe. Raw rows are appended to DIR/hybrid_<size>.jsonl as they come;
a rerun with the same DIR skips the arms already finished there, and an arm cut short by --deadline-s resumes from
its checkpoint (DIR/checkpoints/<arm>.npz|json, written at every evaluation: the population's params and optimizer
state, the step and the curve so far); its finished row then replaces the cut-short one.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import recall  # noqa: E402
from m1jax.config import RunPolicy  # noqa: E402

SIZES = {
    # every code path of "gpu", tiny numbers: CI runs it in seconds
    "cpu": dict(num_layers=2, width=32, heads=2, head_dim=16, arm_order=("0", "1", "2", "L-D32"),
                recipe=dict(seq_len=32, pair_choices=(2, 4, 8), vocab=64, batch_size=8, steps=4, chunk=2,
                            warmup=1),
                lrs=(1e-3, 3e-3), seeds=(0,), eval_rows=4, eval_every=1, lengths=(64,), long_rows=2,
                compute_dtype="float32"),
    # does the trainer learn MQAR at all? 2 layers, 600 steps on the CPU (a few minutes on 2 idle cores)
    "sanity": dict(num_layers=2, width=64, heads=4, head_dim=16, arm_order=("2", "0"),
                   recipe=dict(seq_len=64, pair_choices=(4, 8), vocab=64, batch_size=32, steps=600, chunk=50,
                               warmup=50),
                   lrs=(1e-3, 3e-3), seeds=(0,), eval_rows=64, eval_every=3, lengths=(128,), long_rows=8,
                   compute_dtype="float32"),
    "gpu": dict(num_layers=8, width=128, heads=4, head_dim=32,
                arm_order=("0", "1", "8", "2", "4", "L-D64", "L-D16"),
                recipe=dict(seq_len=128, pair_choices=(4, 8, 16, 32), vocab=256, batch_size=128, steps=15000,
                            chunk=100, warmup=200),
                lrs=(1e-3, 2e-3, 3e-3), seeds=(0, 1, 2), eval_rows=128, eval_every=3, lengths=(256, 1024, 4096),
                long_rows=8, compute_dtype="bfloat16"),
}


ARM_NAME = re.compile(r"\d+|L-D\d+|[SL]+")


def make_arms(size: dict, names=None) -> dict[str, recall.Arm]:
    """Names: "<n>" = n softmax layers of num_layers (M1's spacing); "L-D<d>" = lightning only with head dim d
    (same H*D); a pattern of S and L, one letter per layer from the first (e.g. "SL": softmax under lightning).
    Only the named arms (default: the size's order) are built, so a 2-layer recipe can run arm "2" without arm
    "8". Raises ValueError for a name of no such form, or a d that does not divide H*D."""
    layers, heads, dim, conv = size["num_layers"], size["heads"], size["head_dim"], size.get("short_conv", 0)
    arms = {}
    for name in size["arm_order"] if names is None else names:
        if not ARM_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not an arm: '<n>' (n softmax layers of {layers}), 'L-D<d>' "
                             f"(lightning only, head dim d) or {layers} letters S/L (the layers in order), e.g. "
                             f"{','.join(size['arm_order'])}")
        if name[0] in "SL" and name[1:2] != "-":
            arms[name] = recall.Arm(name, layers, name.count("S"), heads, dim, pattern=name, short_conv=conv)
        elif name.startswith("L-D"):
            d = int(name[3:])
            if d == 0 or (heads * dim) % d:
                raise ValueError(f"arm {name}: head dim {d} does not divide heads x head_dim = {heads * dim}")
            arms[name] = recall.Arm(name, layers, 0, heads * dim // d, d, short_conv=conv)
        else:
            arms[name] = recall.Arm(name, layers, int(name), heads, dim, short_conv=conv)
    return arms


def append(path: str, row: dict):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k not in ("curve",)})[:400], flush=True)


# the size's model entries --recipe sets (short_conv: the lightning layers' convolution width, 0 = none, as M1)
MODEL_KEYS = ("num_layers", "width", "heads", "head_dim", "compute_dtype", "short_conv")


def override(size: dict, items: list[str], lrs: str | None) -> dict:
    """The size with recipe or model entries or its seeds replaced (KEY=VALUE; pair_choices and seeds as 4+8,
    compute_dtype as float32 or bfloat16) and, given, its learning rates."""
    size = dict(size, recipe=dict(size["recipe"]))
    for item in items:
        key, _, value = item.partition("=")
        if key == "seeds" and value:
            try:
                size["seeds"] = tuple(int(v) for v in value.split("+"))
            except ValueError:
                raise SystemExit(f"--recipe {item!r}: seeds takes integers joined by +")
            continue
        if key in MODEL_KEYS and value:
            if key == "compute_dtype" and value not in ("float32", "bfloat16"):
                raise SystemExit(f"--recipe {item!r}: compute_dtype takes float32 or bfloat16")
            if key == "short_conv" and not value.isdigit():
                raise SystemExit(f"--recipe {item!r}: short_conv takes a width >= 0 (0: no convolution)")
            if key not in ("compute_dtype", "short_conv") and not (value.isdigit() and int(value) > 0):
                raise SystemExit(f"--recipe {item!r}: {key} takes a positive integer")
            size[key] = value if key == "compute_dtype" else int(value)
            continue
        if key not in size["recipe"] or not value:
            raise SystemExit(f"--recipe {item!r}: expected KEY=VALUE with KEY one of "
                             f"{sorted(size['recipe']) + list(MODEL_KEYS) + ['seeds']}")
        try:
            size["recipe"][key] = tuple(int(v) for v in value.split("+")) if key == "pair_choices" else int(value)
        except ValueError:
            kind = "integers joined by +" if key == "pair_choices" else "an integer"
            raise SystemExit(f"--recipe {item!r}: {key} takes {kind}")
    if lrs is not None:
        try:
            size["lrs"] = tuple(float(v) for v in lrs.split(","))
        except ValueError:
            raise SystemExit(f"--lrs {lrs!r}: expected comma-separated numbers, e.g. 1e-3,3e-3")
    return size


def done_arms(path: str) -> set:
    """Arms with a final row in `path`, except those cut short that left a checkpoint to resume from."""
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        finals = [json.loads(line) for line in f if line.strip() and '"final"' in line]
    return {row["arm"] for row in finals
            if not (row["cut_short"] and os.path.exists(checkpoint_files(path, row["arm"])[0]))}


# ----- checkpoints: an arm cut short (the call's deadline) resumes from its last evaluation -----
def checkpoint_files(path: str, arm: str) -> tuple[str, str]:
    """(arrays .npz, state .json) of an arm's checkpoint beside the rows file."""
    base = os.path.join(os.path.dirname(path), "checkpoints", arm)
    return base + ".npz", base + ".json"


def save_checkpoint(path: str, arm: str, params, opt_state, state: dict) -> None:
    """The population's params and optimizer state (every member) and `state` (step, plan, curve so far)."""
    arrays, meta = checkpoint_files(path, arm)
    os.makedirs(os.path.dirname(arrays), exist_ok=True)
    leaves = [np.asarray(x) for x in jax.tree.leaves((params, opt_state))]
    with open(arrays + ".tmp", "wb") as f:
        np.savez(f, *leaves)
    with open(meta + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(arrays + ".tmp", arrays)
    os.replace(meta + ".tmp", meta)


def load_checkpoint(path: str, arm: str, plan: dict):
    """(leaves, state) of the arm's checkpoint, or None without one. Raises SystemExit when it was made with
    another plan (architecture, recipe, rates, seeds): resuming it would mix two runs."""
    arrays, meta = checkpoint_files(path, arm)
    if not os.path.exists(arrays):
        return None
    with open(meta) as f:
        state = json.load(f)
    if state["plan"] != plan:
        changed = sorted(k for k in set(plan) | set(state["plan"]) if plan.get(k) != state["plan"].get(k))
        raise SystemExit(f"arm {arm}: the checkpoint in {os.path.dirname(arrays)} was made with another {changed}; "
                         "rerun with the same --recipe, --steps and --lrs, or give a fresh --out")
    with np.load(arrays) as data:
        leaves = [data[f"arr_{i}"] for i in range(len(data.files))]
    return leaves, state


def restore(leaves: list, params, opt_state):
    """The checkpoint's leaves in the structure (and dtypes) of a freshly built population's state."""
    template, treedef = jax.tree.flatten((params, opt_state))
    if len(leaves) != len(template) or any(a.shape != t.shape for a, t in zip(leaves, template)):
        raise SystemExit("the checkpoint's arrays do not match this population's (another model?); give a fresh "
                         "--out")
    fitted = [a if a.dtype == t.dtype else a.view(t.dtype) for a, t in zip(leaves, template)]
    return jax.tree.unflatten(treedef, [jnp.asarray(a) for a in fitted])


def drop_rows(path: str, arm: str) -> None:
    """Rewrite the rows file without `arm`'s rows: its cut-short row, which a resumed run's row extends (the same
    curve from the start), and the length rows that followed it."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows if row["arm"] != arm)
    os.replace(path + ".tmp", path)


def probe_pairs(pair_choices, length: int, vocab: int) -> tuple[int, ...]:
    """The P values of the length probe at `length`: the training's smallest and largest, then the largest doubled
    while the row holds the pairs and their queries (4P <= length), and all the keys (vocab - 1) // 2 when they fit:
    the capacity probe of models that learned, which asks for more pairs than any training row held."""
    low, high, num_keys = min(pair_choices), max(pair_choices), (vocab - 1) // 2
    values = [low, high]
    while 4 * min(2 * values[-1], num_keys) <= length and values[-1] < num_keys:
        values.append(min(2 * values[-1], num_keys))
    return tuple(dict.fromkeys(values))


def long_batch(seed: int, length: int, size: dict) -> tuple[dict, np.ndarray]:
    """MQAR rows at probe_pairs' P spread over `length`, then needle rows: one (B, length) batch.
    Returns (batch, group label per row: "mqar-P<p>" or "needle")."""
    recipe = size["recipe"]
    rows, vocab = size["long_rows"], recipe["vocab"]
    pair_values = probe_pairs(recipe["pair_choices"], length, vocab)
    mq = recall.eval_batch(seed + 1000 * length, pair_values, rows, length, vocab)
    nd = recall.needle_batch(jax.random.fold_in(jax.random.key(seed), 4 + length), 2 * rows, length, vocab)
    batch = {k: jnp.concatenate([mq[k], nd[k]]) for k in ("inputs", "targets", "mask")}
    groups = np.array([f"mqar-P{int(p)}" for p in np.asarray(mq["pairs"])] + ["needle"] * (2 * rows))
    batch["group"] = groups
    depth_bin = np.concatenate([np.full(len(np.asarray(mq["pairs"])), -1),
                                np.minimum(4 * np.asarray(nd["depth"]) // length, 3)])
    batch["depth_bin"] = depth_bin
    return batch, groups


MODES = [("vmap", "auto"), ("vmap", "chunked"), ("map", "chunked")]  # (population, lightning impl), in order


def first_chunk(config, recipe, lrs, seeds, policy):
    """Build the population and run its first chunk in the first mode of MODES that compiles and runs; a mode that
    fails is dropped for the rest of the run (and said so)."""
    import dataclasses
    while MODES:
        population, impl = MODES[0]
        try:
            recall.use_lightning_impl(impl)
            pop = recall.Population(config, dataclasses.replace(recipe, population=population), lrs, seeds, policy)
            params, opt_state = pop.init()
            params, opt_state, loss = pop.train_chunk(params, opt_state, 0)
            loss.block_until_ready()
            print(f"  mode: population={population}, lightning impl={impl}", flush=True)
            return pop, params, opt_state, loss
        except Exception as err:  # noqa: BLE001 - any compile/run failure moves to the next mode
            print(f"  mode population={population} impl={impl} failed: {type(err).__name__}: {str(err)[:500]}",
                  flush=True)
            if len(MODES) == 1:
                raise
            MODES.pop(0)
    raise RuntimeError("no population mode left")


def run_arm(arm: recall.Arm, size: dict, path: str, deadline: float, train_budget_s: float | None = None):
    recipe = recall.Recipe(population=MODES[0][0], **size["recipe"])
    config = recall.arm_config(arm, size["width"], recipe.vocab)
    policy = RunPolicy(compute_dtype=size["compute_dtype"])
    lrs = [lr for lr in size["lrs"] for _ in size["seeds"]]
    seeds = [s for _ in size["lrs"] for s in size["seeds"]]
    start = time.perf_counter()
    held_out = recall.eval_batch(12345, recipe.pair_choices, size["eval_rows"], recipe.seq_len, recipe.vocab)
    curve, step, cut_short = [], 0, False
    compile_s, total = None, recipe.steps
    plan = {"layer_types": list(arm.layer_types), "heads": arm.num_heads, "head_dim": arm.head_dim,
            "short_conv": arm.short_conv, "width": size["width"], "compute_dtype": size["compute_dtype"], "lrs": lrs, "seeds": seeds,
            "recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in size["recipe"].items()}}
    resume, resumed_at = load_checkpoint(path, arm.name, plan), None
    while step < total:
        t0 = time.perf_counter()
        if compile_s is None:  # the first chunk compiles: fall back to slower modes if a kernel refuses the vmap
            pop, params, opt_state, loss = first_chunk(config, recipe, lrs, seeds, policy)
            recipe = pop.recipe
            if resume is not None:  # the checkpoint's state replaces the chunk just run
                (leaves, state), resume = resume, None
                params, opt_state = restore(leaves, params, opt_state)
                step = resumed_at = state["step"]
                curve, total, compile_s = state["curve"], state["steps_planned"], time.perf_counter() - t0
                start = time.perf_counter() - state["train_seconds"]
                print(f"  arm {arm.name}: resumed from its checkpoint at step {step} of {total}", flush=True)
                continue
        else:
            params, opt_state, loss = pop.train_chunk(params, opt_state, step, total)
        loss = np.asarray(loss)
        if compile_s is None:
            compile_s = time.perf_counter() - t0
        elif step == recipe.chunk and train_budget_s:  # the second chunk timed: fit the plan to the budget
            chunks = max(3, int((train_budget_s - compile_s) / (time.perf_counter() - t0)))
            total = min(recipe.steps, recipe.chunk * chunks)
            print(f"  arm {arm.name}: {time.perf_counter() - t0:.2f} s per {recipe.chunk} steps: plan {total} "
                  "steps", flush=True)
        step += recipe.chunk
        point = {"step": step, "loss": loss.tolist(), "seconds": time.perf_counter() - start}
        evaluated = (step // recipe.chunk) % size["eval_every"] == 0 or step >= total
        if evaluated:
            point["accuracy"] = recall.accuracy_by(pop.evaluate(params, held_out), held_out, "pairs")
        curve.append(point)
        print(f"  arm {arm.name} step {step} loss {np.round(loss, 3).tolist()} ({point['seconds']:.0f} s)",
              flush=True)
        cut_short = time.perf_counter() > deadline and step < total
        if (evaluated or cut_short) and step < total:
            save_checkpoint(path, arm.name, params, opt_state,
                            {"plan": plan, "step": step, "steps_planned": total, "curve": curve,
                             "train_seconds": time.perf_counter() - start})
        if cut_short:
            break
    train_s = time.perf_counter() - start
    final = recall.accuracy_by(pop.evaluate(params, held_out), held_out, "pairs")
    row = {"arm": arm.name, "kind": "final", "layer_types": list(arm.layer_types), "heads": arm.num_heads,
           "head_dim": arm.head_dim, "short_conv": arm.short_conv, "state_floats": arm.state_floats, "params": recall.count_params(config),
           "lrs": lrs, "seeds": seeds, "steps_done": step, "steps_planned": total, "cut_short": cut_short,
           "train_seconds": train_s,
           "first_chunk_seconds": compile_s, "accuracy_by_pairs": final, "curve": curve,
           "recipe": {k: getattr(recipe, k) for k in ("seq_len", "pair_choices", "vocab", "batch_size", "steps",
                                                      "chunk", "warmup", "weight_decay", "population")},
           "lightning_impl": MODES[0][1], "resumed_at": resumed_at,
           "width": size["width"], "compute_dtype": size["compute_dtype"], "device": jax.devices()[0].device_kind}
    if resumed_at is not None:
        drop_rows(path, arm.name)  # the cut-short row this one extends
    append(path, row)
    if not cut_short:
        for name in checkpoint_files(path, arm.name):
            if os.path.exists(name):
                os.remove(name)
    for length in size["lengths"]:
        if time.perf_counter() > deadline + 60:
            print(f"  arm {arm.name}: past the deadline, length {length} not evaluated", flush=True)
            break
        t0 = time.perf_counter()
        batch, groups = long_batch(7, length, size)
        correct = pop.evaluate(params, batch)
        result = recall.accuracy_by(correct, batch, "group")
        needle = {int(b): v for b, v in recall.accuracy_by(
            correct[:, groups == "needle"], {"mask": np.asarray(batch["mask"])[groups == "needle"],
                                             "bin": batch["depth_bin"][groups == "needle"]}, "bin").items()}
        append(path, {"arm": arm.name, "kind": "length", "length": length, "train_length": recipe.seq_len,
                      "accuracy_by_group": {str(k): v for k, v in result.items()}, "needle_by_depth_quarter": needle,
                      "rows_per_group": int(size["long_rows"]), "seconds": time.perf_counter() - t0})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--out", default=os.path.join("runs", "hybrid_ablation"))
    parser.add_argument("--arms", default=None, help="comma-separated arm names (default: the size's order)")
    parser.add_argument("--steps", type=int, default=None, help="override the size's training steps")
    parser.add_argument("--recipe", action="append", default=[], metavar="KEY=VALUE",
                        help="override an entry of the size's recipe or model, or its seeds (repeatable), e.g. "
                             "seq_len=64 pair_choices=4+8 vocab=64 num_layers=2 width=64 compute_dtype=float32 "
                             "seeds=0+1; give a fresh --out, since finished arms in --out are skipped")
    parser.add_argument("--lrs", default=None, help="comma-separated learning rates (default: the size's)")
    parser.add_argument("--deadline-s", type=float, default=1e9, help="stop training arms after this many seconds")
    parser.add_argument("--train-budget-s", type=float, default=None,
                        help="per arm: shorten the planned steps (the cosine too) to fit this many seconds")
    parser.add_argument("--mode", type=int, default=0, help="start at this entry of MODES (0: vmap + Pallas)")
    parser.add_argument("--report", nargs="+", default=None, metavar="JSONL",
                        help="hybrid_*.jsonl files: write summaries and figures (populations pooled), no training")
    parser.add_argument("--results-dir", default=os.path.join(os.path.dirname(HERE), "results"))
    args = parser.parse_args(argv)
    if args.report:
        import report
        return report.write_all(args.report, args.results_dir)
    size = override(SIZES[args.size], args.recipe + ([f"steps={args.steps}"] if args.steps is not None else []),
                    args.lrs)
    del MODES[:args.mode]
    names = args.arms.split(",") if args.arms else list(size["arm_order"])
    try:
        arms = make_arms(size, names)
        for arm in arms.values():
            _ = arm.layer_types  # a softmax count that does not divide num_layers fails here, before any training
    except ValueError as error:
        raise SystemExit(f"--arms with num_layers={size['num_layers']}, heads={size['heads']}, "
                         f"head_dim={size['head_dim']}: {error}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"hybrid_{args.size}.jsonl")
    finished = done_arms(path)
    deadline = time.perf_counter() + args.deadline_s
    for name in names:
        if name in finished:
            print(f"arm {name}: already in {path}, skipped", flush=True)
            continue
        if time.perf_counter() > deadline:
            print(f"arm {name}: deadline reached, not run", flush=True)
            continue
        print(f"arm {name}: {arms[name]}", flush=True)
        run_arm(arms[name], size, path, deadline, args.train_budget_s)
    return path


if __name__ == "__main__":
    main()
