"""Summaries and figures of the hybrid ablation and its length probe, from the raw rows run.py appends.

    python experiments/hybrid_ablation/run.py --report runs/hybrid_ablation/hybrid_gpu.jsonl [--results-dir DIR]

Fair tuning: an arm's best learning rate is the one with the highest held-out recall at the training length
(mean over its seeds and over P); the arm is then reported at that rate, mean and standard deviation over seeds.
Writes DIR/hybrid_ablation_<size>.json|png and DIR/length_extrapolation_<size>.json|png; the notebook
notebooks/07_hybrid_ablation.py draws the same figures from the JSON.
"""
from __future__ import annotations

import json
import os

import numpy as np


def finish_figure(fig, path):
    """Lay out `fig`; write it to `path` and close it, or, with path None, return it (the notebooks show it)."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def read_rows(paths) -> list[dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            if path.endswith(".jsonl"):
                rows += [json.loads(line) for line in f if line.strip()]
            else:
                rows += json.load(f)["raw"]
    return rows


def matched_keys_at(curve: list[dict], member: int) -> int | None:
    """The first evaluated step at which `member` matches keys: held-out recall at the row's smallest P above
    (1 + 1/P) / 2, halfway from the "one of the row's values" level 1/P (reached without matching any key) to
    100% (62.5% at P = 4). None if it never does. Key matching emerges as a jump whose timing varies from seed to
    seed, so arms are compared by how many seeds reach it, not only by mean recall."""
    for point in curve:
        accuracy = point.get("accuracy")
        if accuracy:
            p = min(accuracy, key=int)
            if accuracy[p][member] > (1 + 1 / int(p)) / 2:
                return int(point["step"])
    return None


def summarize(rows: list[dict]) -> dict:
    """{"arms": {name: summary}, "lengths": {name: {length: {group: {mean, std, per_seed}}}}}."""
    arms, lengths = {}, {}
    for row in rows:
        if row["kind"] != "final":
            continue
        lrs, by_pairs = np.asarray(row["lrs"]), row["accuracy_by_pairs"]
        pairs = sorted(by_pairs, key=int)
        acc = np.asarray([by_pairs[p] for p in pairs])  # (P values, members)
        per_lr = {float(lr): float(acc[:, lrs == lr].mean()) for lr in np.unique(lrs)}
        best = max(per_lr, key=per_lr.get)
        members = lrs == best
        arms[row["arm"]] = {
            "layer_types": row["layer_types"], "softmax_layers": row["layer_types"].count("softmax"),
            "heads": row["heads"], "head_dim": row["head_dim"], "state_floats": row["state_floats"],
            "params": row["params"], "steps": row["steps_done"], "cut_short": row["cut_short"],
            "train_seconds": row["train_seconds"], "recipe": row["recipe"], "device": row.get("device"),
            "lightning_impl": row.get("lightning_impl"), "mean_accuracy_per_lr": per_lr, "best_lr": best,
            "seeds": [int(s) for s in np.asarray(row["seeds"])[members]],
            "accuracy_by_pairs": {p: {"mean": float(acc[i, members].mean()), "std": float(acc[i, members].std()),
                                      "per_seed": acc[i, members].tolist()} for i, p in enumerate(pairs)},
            "final_loss_at_best_lr": float(np.mean(np.asarray(row["curve"][-1]["loss"])[members])),
            "matched_keys_at": [matched_keys_at(row["curve"], int(m)) for m in np.flatnonzero(members)],
        }
    for row in rows:
        if row["kind"] != "length" or row["arm"] not in arms:
            continue
        final = next(r for r in rows if r["kind"] == "final" and r["arm"] == row["arm"])
        members = np.asarray(final["lrs"]) == arms[row["arm"]]["best_lr"]
        entry = lengths.setdefault(row["arm"], {})
        entry[str(row["length"])] = {
            group: {"mean": float(np.asarray(v)[members].mean()), "std": float(np.asarray(v)[members].std()),
                    "per_seed": np.asarray(v)[members].tolist()}
            for group, v in row["accuracy_by_group"].items()}
        entry[str(row["length"])]["train_length"] = row["train_length"]
    return {"arms": arms, "lengths": lengths}


def plot_hybrid(summary: dict, path: str, title: str):
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, arm in summary["arms"].items():
        pairs = sorted(arm["accuracy_by_pairs"], key=int)
        mean = [100 * arm["accuracy_by_pairs"][p]["mean"] for p in pairs]
        std = [100 * arm["accuracy_by_pairs"][p]["std"] for p in pairs]
        label = (f"{arm['softmax_layers']}/{len(arm['layer_types'])} softmax" if not name.startswith("L-")
                 else f"lightning only, D={arm['head_dim']}")
        left.errorbar([int(p) for p in pairs], mean, yerr=std, marker="o", capsize=3,
                      label=f"{label} (lr {arm['best_lr']:g})")
    recipe = next(iter(summary["arms"].values()))["recipe"]
    chance = 100 / (recipe["vocab"] - 1 - (recipe["vocab"] - 1) // 2)  # one of the value ids
    left.axhline(chance, color="gray", ls=":", lw=1, label=f"chance ({chance:.2g}%)")
    left.set_xscale("log", base=2)
    left.set_xlabel("key-value pairs P")
    left.set_ylabel("held-out recall (%), best lr, mean ± sd over seeds")
    left.set_title(title, fontsize=9)
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    lightning = {n: a for n, a in summary["arms"].items() if a["softmax_layers"] == 0}
    for p in sorted(next(iter(summary["arms"].values()))["accuracy_by_pairs"], key=int) if lightning else ():
        xs = sorted(lightning.values(), key=lambda a: a["state_floats"])
        right.errorbar([a["state_floats"] for a in xs], [100 * a["accuracy_by_pairs"][p]["mean"] for a in xs],
                       yerr=[100 * a["accuracy_by_pairs"][p]["std"] for a in xs], marker="o", capsize=3,
                       label=f"P={p}")
    right.set_xscale("log", base=2)
    right.set_xlabel("lightning state per layer, H·D·D floats")
    right.set_ylabel("held-out recall (%)")
    right.set_title("lightning only: recall against state size", fontsize=9)
    if lightning:
        right.legend(fontsize=7)
    right.grid(alpha=0.3)
    return finish_figure(fig, path)


def plot_lengths(summary: dict, path: str, title: str):
    import matplotlib.pyplot as plt
    groups = sorted({g for arm in summary["lengths"].values() for entry in arm.values() for g in entry
                     if g != "train_length"})
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(4 * max(len(groups), 1), 3.6), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for name, entry in summary["lengths"].items():
            arm = summary["arms"][name]
            xs = sorted(entry, key=int)
            train_length = entry[xs[0]]["train_length"]
            points = [(train_length, arm["accuracy_by_pairs"].get(group[6:], {}).get("mean"))] \
                if group.startswith("mqar-P") else []
            points += [(int(x), entry[x][group]["mean"]) for x in xs if group in entry[x]]
            points = [(x, y) for x, y in points if y is not None]
            ax.plot([x / train_length for x, _ in points], [100 * y for _, y in points], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("evaluation length / training length")
        ax.set_ylabel("recall (%), best lr, mean over seeds")
        ax.set_title(f"{group}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="softmax layers / arm")
    fig.suptitle(title, fontsize=9)
    return finish_figure(fig, path)


def write_all(paths, results_dir: str) -> dict:
    rows = read_rows(paths)
    size = "gpu" if any(r.get("device", "cpu") not in (None, "cpu") for r in rows if r["kind"] == "final") else "cpu"
    summary = summarize(rows)
    os.makedirs(results_dir, exist_ok=True)
    first = next(iter(summary["arms"].values()))
    recipe = first["recipe"]
    title = (f"MQAR, T={recipe['seq_len']}, vocab {recipe['vocab']}, P per row from {recipe['pair_choices']}, "
             f"{first['steps']} steps, {first.get('device')}")
    hybrid = {"summary": summary["arms"], "raw": [r for r in rows if r["kind"] == "final"]}
    with open(os.path.join(results_dir, f"hybrid_ablation_{size}.json"), "w") as f:
        json.dump(hybrid, f, indent=1)
    with open(os.path.join(results_dir, f"length_extrapolation_{size}.json"), "w") as f:
        json.dump({"summary": summary["lengths"], "raw": [r for r in rows if r["kind"] == "length"]}, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        plot_hybrid(summary, os.path.join(results_dir, f"hybrid_ablation_{size}.png"), title)
        plot_lengths(summary, os.path.join(results_dir, f"length_extrapolation_{size}.png"),
                     f"trained at T={recipe['seq_len']}: recall at longer rows")
    except ImportError:
        pass
    for name, arm in summary["arms"].items():
        cells = ", ".join(f"P={p}: {100 * v['mean']:.1f}±{100 * v['std']:.1f}%"
                          for p, v in arm["accuracy_by_pairs"].items())
        matched = [step for step in arm["matched_keys_at"] if step is not None]
        print(f"{name:6s} lr {arm['best_lr']:g} steps {arm['steps']} loss {arm['final_loss_at_best_lr']:.3f} {cells}; "
              f"keys matched on {len(matched)} of {len(arm['matched_keys_at'])} seeds (steps {matched})")
    return summary
