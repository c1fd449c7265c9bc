"""Summaries and figures of the hybrid ablation and its length probe, from the raw rows run.py appends.

    python experiments/hybrid_ablation/run.py --report A.jsonl [B.jsonl ...] [--results-dir DIR]

Fair tuning: an arm's best learning rate is the one with the highest held-out recall at the training length
(mean over its seeds and over P); the arm is then reported at that rate, mean and standard deviation over seeds.
Populations of one arm, depth and step plan in several files (other seeds) are pooled. Key matching is counted
per arm and rate (`key_matching`), and the members that did are followed past the training P and length
(`capacity`). Writes DIR/hybrid_ablation_<size>.json|png, DIR/key_matching_<size>.png, DIR/capacity_<size>.png and
DIR/length_extrapolation_<size>.json|png; the notebook
notebooks/07_hybrid_ablation.py draws the same figures from the JSON.
"""
from __future__ import annotations

import json
import os

import numpy as np


def finish_figure(fig, path, rect=(0, 0, 1, 1)):
    """Lay out `fig` (in `rect` of it: room left for a figure legend; a figure made with a layout engine keeps
    its own); write it to `path` and close it, or, with path None, return it (the notebooks show it)."""
    import matplotlib.pyplot as plt
    if fig.get_layout_engine() is None:
        fig.tight_layout(rect=rect)
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


# what tells two populations of one arm apart: (name, how a label shows it, its value in a final row)
PLAN_FIELDS = (
    ("layers", "{} layers", lambda r: len(r["layer_types"])),
    ("steps", "{} steps", lambda r: r["steps_planned"]),
    ("seq_len", "T {}", lambda r: r["recipe"]["seq_len"]),
    ("pairs", "P {}", lambda r: "+".join(str(p) for p in r["recipe"].get("pair_choices", ()))),
    ("split", "{}", lambda r: f"{r['heads']}x{r['head_dim']}"),
    ("short_conv", "{}", lambda r: f"conv {r['short_conv']}" if r.get("short_conv") else "no conv"),
    ("rows", "{} rows", lambda r: r["recipe"].get("batch_size")),
    ("width", "width {}", lambda r: r.get("width")),
    ("warmup", "warmup {}", lambda r: r["recipe"]["warmup"]),
    ("dtype", "{}", lambda r: r.get("compute_dtype")),
)


def plan_of(row: dict) -> dict:
    return {name: value(row) for name, _, value in PLAN_FIELDS}


def group_rows(rows: list[dict]) -> dict[str, dict]:
    """Final rows of one arm and one plan (depth, steps, training length, P, head split, convolution, rows, width,
    warmup, dtype) pooled into one group of members (populations run on different seeds in several calls add up), each
    length row attached to the final row it follows (run.py appends them right after it). The label is the arm's
    name followed by the plan entries that differ between populations of some arm, e.g. "8, 8 layers, 4000 steps"
    when one arm ran at two depths. Returns {label: {"finals": [rows], "lengths": {length: [rows, one per final
    row]}, "plan": {entry: text shown in the label}}}."""
    finals = [r for r in rows if r["kind"] == "final"]
    plans_of_arm: dict[str, list] = {}
    for row in finals:
        plans_of_arm.setdefault(row["arm"], []).append(plan_of(row))
    varying = [(name, form) for name, form, _ in PLAN_FIELDS
               if any(len({plan[name] for plan in plans}) > 1 for plans in plans_of_arm.values())]
    groups, last = {}, {}
    for row in rows:
        if row["kind"] == "final":
            plan = plan_of(row)
            shown = {name: form.format(plan[name]) for name, form in varying}
            label = ", ".join([row["arm"], *shown.values()])
            groups.setdefault(label, {"finals": [], "lengths": {}, "plan": shown})["finals"].append(row)
            last[row["arm"]] = label
        elif row["kind"] == "length" and row["arm"] in last:
            groups[last[row["arm"]]]["lengths"].setdefault(row["length"], []).append(row)
    return groups


def summarize(rows: list[dict]) -> dict:
    """{"arms": {label: summary}, "lengths": {label: {length: {group: {mean, std, per_seed}}}}}, over the members
    of each group_rows group (a length is kept only where every final row of the group has it)."""
    arms, lengths = {}, {}
    for label, group in group_rows(rows).items():
        finals = group["finals"]
        row = finals[0]
        lrs = np.concatenate([r["lrs"] for r in finals])
        pairs = sorted(row["accuracy_by_pairs"], key=int)
        if any(sorted(r["accuracy_by_pairs"], key=int) != pairs for r in finals):
            raise ValueError(f"arm {label}: its rows were evaluated at different P; report them separately")
        acc = np.concatenate([np.asarray([r["accuracy_by_pairs"][p] for p in pairs]) for r in finals], axis=1)
        per_lr = {float(lr): float(acc[:, lrs == lr].mean()) for lr in np.unique(lrs)}
        best = max(per_lr, key=per_lr.get)
        members = lrs == best
        losses = np.concatenate([r["curve"][-1]["loss"] for r in finals])
        matched = [matched_keys_at(r["curve"], m) for r in finals for m in range(len(r["lrs"]))]
        arms[label] = {
            "arm": row["arm"], "layer_types": row["layer_types"], "softmax_layers": row["layer_types"].count("softmax"),
            "heads": row["heads"], "head_dim": row["head_dim"], "state_floats": row["state_floats"],
            "short_conv": row.get("short_conv", 0), "params": row["params"],
            "steps": min(r["steps_done"] for r in finals),
            "cut_short": any(r["cut_short"] for r in finals),
            "train_seconds": sum(r["train_seconds"] for r in finals), "recipe": row["recipe"],
            "device": row.get("device"), "lightning_impl": row.get("lightning_impl"), "mean_accuracy_per_lr": per_lr,
            "best_lr": best, "seeds": [int(s) for s in np.concatenate([r["seeds"] for r in finals])[members]],
            "accuracy_by_pairs": {p: {"mean": float(acc[i, members].mean()), "std": float(acc[i, members].std()),
                                      "per_seed": acc[i, members].tolist()} for i, p in enumerate(pairs)},
            "final_loss_at_best_lr": float(losses[members].mean()),
            "matched_keys_at": [m for m, keep in zip(matched, members) if keep],
        }
        for length, length_rows in group["lengths"].items():
            if len(length_rows) != len(finals):
                continue
            entry = lengths.setdefault(label, {})
            entry[str(length)] = {
                name: {"mean": float(v[members].mean()), "std": float(v[members].std()),
                       "per_seed": v[members].tolist()}
                for name in length_rows[0]["accuracy_by_group"]
                if all(name in r["accuracy_by_group"] for r in length_rows)  # older rows probed fewer P
                for v in [np.concatenate([r["accuracy_by_group"][name] for r in length_rows])]}
            entry[str(length)]["train_length"] = length_rows[0]["train_length"]
    return {"arms": arms, "lengths": lengths}


def capacity(rows: list[dict]) -> dict:
    """Recall of the members that matched keys, against P, at the training length and at each probe length (where
    run.probe_pairs asked for more pairs than training held): {label: {"train_length", "state_floats", "head_dim",
    "seeds" (those that matched), "recall": {length: {P: mean over them}}}} (a P over those whose probe asked for
    it: populations run before the probe grew asked only the training's smallest and largest); groups with no such
    member are left out. Averaging only learned members separates what a learned mechanism holds from whether it
    was learned."""
    table = {}
    for label, group in group_rows(rows).items():
        finals = group["finals"]
        learned = [(r, m) for r in finals for m in range(len(r["lrs"])) if matched_keys_at(r["curve"], m) is not None]
        if not learned:
            continue
        first = finals[0]
        train_length = first["recipe"]["seq_len"]
        recall = {str(train_length): {p: float(np.mean([r["accuracy_by_pairs"][p][m] for r, m in learned]))
                                      for p in first["accuracy_by_pairs"]}}
        for length, length_rows in sorted(group["lengths"].items()):
            if len(length_rows) != len(finals):
                continue
            probe = {id(r): row["accuracy_by_group"] for r, row in zip(finals, length_rows)}
            names = sorted({name for row in length_rows for name in row["accuracy_by_group"]
                            if name.startswith("mqar-P")}, key=lambda name: int(name[6:]))
            recall[str(length)] = {name[6:]: float(np.mean([probe[id(r)][name][m] for r, m in learned
                                                             if name in probe[id(r)]]))
                                   for name in names if any(name in probe[id(r)] for r, _ in learned)}
        table[label] = {"train_length": train_length, "state_floats": first["state_floats"],
                        "head_dim": first["head_dim"], "layer_types": first["layer_types"],
                        "seeds": [int(r["seeds"][m]) for r, m in learned],
                        "members": sum(len(r["lrs"]) for r in finals),
                        "recall": recall}
    return table


def probed_past_training(table: dict) -> dict:
    """The groups of a capacity table whose probe asked for more pairs than their training held."""
    return {label: entry for label, entry in table.items()
            if max(int(p) for values in entry["recall"].values() for p in values)
            > max(int(p) for p in entry["recall"][str(entry["train_length"])])}


def plot_capacity(table: dict, path: str | None, title: str):
    """One panel per evaluation length: recall of the learned members against P (log scale), a line per group whose
    probe asked for more pairs than its training held (one colour per group in every panel, dashed with the lightning
    convolution, legend below); dotted verticals at the lightning head dims D (a D x D state per head holds about D
    independent keys)."""
    import matplotlib.pyplot as plt
    probed = probed_past_training(table)
    lengths = sorted({int(length) for entry in probed.values() for length in entry["recall"]})
    fig, axes = plt.subplots(1, max(len(lengths), 1), figsize=(3.6 * max(len(lengths), 1), 4.4), squeeze=False)
    colours = {label: plt.cm.tab20(i % 20) for i, label in enumerate(probed)}
    dims = sorted({e["head_dim"] for e in probed.values() if e["state_floats"]})
    for ax, length in zip(axes[0], lengths):
        for label, entry in probed.items():
            values = entry["recall"].get(str(length))
            if values:
                ps = sorted(values, key=int)
                ax.plot([int(p) for p in ps], [100 * values[p] for p in ps], marker="o", color=colours[label],
                        ls="--" if ", conv " in label else "-",
                        label=f"{label} ({len(entry['seeds'])}/{entry['members']} learned)")
        for d in dims:
            ax.axvline(d, color="gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-3, 103)
        ax.set_xlabel("pairs P (dotted: lightning head dim)", fontsize=8)
        ax.set_ylabel("recall (%), members that matched keys", fontsize=8)
        ax.set_title(f"rows of {length} tokens", fontsize=9)
        ax.grid(alpha=0.3)
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines() if not h.get_label().startswith("_")}
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=2, fontsize=7)
    fig.suptitle(title, fontsize=9)
    return finish_figure(fig, path, rect=(0, 0.06 + 0.035 * ((len(handles) + 1) // 2), 1, 1))


def arm_title(arm: str, layer_types: list[str], heads: int, head_dim: int) -> str:
    """How figures name an arm: "k/L softmax" (M1's spacing), the layer order for an S/L pattern, or
    "lightning HxD"."""
    softmax = layer_types.count("softmax")
    if arm and set(arm) <= {"S", "L"}:
        return f"layers {arm}" + ("" if softmax else f" {heads}x{head_dim}")
    return f"{softmax}/{len(layer_types)} softmax" if softmax else f"lightning {heads}x{head_dim}"


def key_matching(rows: list[dict]) -> list[dict]:
    """Per group of group_rows and learning rate: how many seeds matched keys, and at which steps. Emergence is a
    seed-dependent jump, so this count, not the mean recall, is what compares arms."""
    table = []
    for label, group in group_rows(rows).items():
        finals = group["finals"]
        row = finals[0]
        members = [(lr, seed, matched_keys_at(r["curve"], m)) for r in finals
                   for m, (lr, seed) in enumerate(zip(r["lrs"], r["seeds"]))]
        for lr in sorted({m[0] for m in members}):
            at = [(seed, step) for m_lr, seed, step in members if m_lr == lr]
            table.append({"label": label, "arm": row["arm"], "layers": len(row["layer_types"]), "plan": group["plan"],
                          "title": arm_title(row["arm"], row["layer_types"], row["heads"], row["head_dim"]),
                          "softmax_layers": row["layer_types"].count("softmax"), "state_floats": row["state_floats"],
                          "heads": row["heads"], "head_dim": row["head_dim"], "lr": float(lr),
                          "steps": row["steps_planned"], "warmup": row["recipe"]["warmup"],
                          "seq_len": row["recipe"]["seq_len"],
                          "seeds": [s for s, _ in at], "matched_keys_at": [step for _, step in at],
                          "matched": sum(step is not None for _, step in at)})
    return table


def plot_key_matching(table: list[dict], path: str | None, title: str):
    """Horizontal bars: the share of seeds that matched keys per arm and rate, "k/n" beside each; one panel per
    depth, step plan and training length, stacked (a bar per line keeps long plan labels readable)."""
    import matplotlib.pyplot as plt
    panel_of = lambda t: (t["layers"], t["steps"], t["seq_len"])  # noqa: E731
    panels = sorted({panel_of(t) for t in table})
    cells = {panel: sorted((t for t in table if panel_of(t) == panel),
                           key=lambda t: (t["softmax_layers"], -t["state_floats"], t["label"], t["lr"]))
             for panel in panels}
    counts = [len(cells[panel]) for panel in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 1.2 + 0.24 * sum(counts) + 0.5 * len(panels)),
                             squeeze=False, gridspec_kw={"height_ratios": [n + 1.5 for n in counts]},
                             layout="constrained")
    for ax, (layers, steps, seq_len) in zip(axes[:, 0], panels):
        panel = cells[(layers, steps, seq_len)]
        names = [", ".join([t["title"].removeprefix("layers "), *(v for k, v in t.get("plan", {}).items()
                                          if k not in ("layers", "steps", "seq_len") and v not in t["title"]),
                            f"lr {t['lr']:g}"])
                 for t in panel]
        bars = ax.barh(range(len(panel)), [100 * t["matched"] / len(t["seeds"]) for t in panel],
                       color=["tab:orange" if t["softmax_layers"] == 0 else "tab:blue" for t in panel])
        for bar, t in zip(bars, panel):
            ax.text(bar.get_width() + 1.5, bar.get_y() + bar.get_height() / 2, f"{t['matched']}/{len(t['seeds'])}",
                    va="center", fontsize=7)
        ax.set_yticks(range(len(panel)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 110)
        ax.set_title(f"{layers} layers, {steps} steps, T {seq_len}", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    axes[-1, 0].set_xlabel("seeds that matched keys (%)")
    fig.suptitle(title, fontsize=9)
    return finish_figure(fig, path)


def plot_hybrid(summary: dict, path: str, title: str):
    """Left: recall against P per arm at its best rate (legend below the panels). Right: lightning-only arms'
    recall against their state size, a line per P and plan (with the convolution apart)."""
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2 + 0.11 * len(summary["arms"])))
    for i, (name, arm) in enumerate(summary["arms"].items()):
        pairs = sorted(arm["accuracy_by_pairs"], key=int)
        mean = [100 * arm["accuracy_by_pairs"][p]["mean"] for p in pairs]
        std = [100 * arm["accuracy_by_pairs"][p]["std"] for p in pairs]
        label = arm_title(arm["arm"], arm["layer_types"], arm["heads"], arm["head_dim"])
        label += "" if name == arm["arm"] else name[len(arm["arm"]):]
        left.errorbar([int(p) for p in pairs], mean, yerr=std, marker="o", capsize=3, color=plt.cm.tab20(i % 20),
                      ls="--" if arm.get("short_conv") else "-", label=f"{label} (lr {arm['best_lr']:g})")
    recipe = next(iter(summary["arms"].values()))["recipe"]
    chance = 100 / (recipe["vocab"] - 1 - (recipe["vocab"] - 1) // 2)  # one of the value ids
    left.axhline(chance, color="gray", ls=":", lw=1, label=f"chance ({chance:.2g}%)")
    left.set_xscale("log", base=2)
    left.set_xlabel("key-value pairs P")
    left.set_ylabel("held-out recall (%), best lr, mean ± sd over seeds")
    left.set_title(title, fontsize=9)
    left.grid(alpha=0.3)
    lightning = [a for a in summary["arms"].values() if a["softmax_layers"] == 0]
    plan = lambda a: (len(a["layer_types"]), a["steps"], a.get("short_conv", 0))  # noqa: E731
    plans = sorted({plan(a) for a in lightning})
    for layers, steps, conv in plans:
        xs = sorted((a for a in lightning if plan(a) == (layers, steps, conv)), key=lambda a: a["state_floats"])
        for p in sorted(xs[0]["accuracy_by_pairs"], key=int):
            right.errorbar([a["state_floats"] for a in xs], [100 * a["accuracy_by_pairs"][p]["mean"] for a in xs],
                           yerr=[100 * a["accuracy_by_pairs"][p]["std"] for a in xs], marker="o", capsize=3,
                           ls="--" if conv else "-", label=f"P={p}" + (
                               f", {layers} layers, {steps} steps" + (f", conv {conv}" if conv else "")
                               if len(plans) > 1 else ""))
    right.set_xscale("log", base=2)
    right.set_xlabel("lightning state per layer, H·D·D floats")
    right.set_ylabel("held-out recall (%)")
    right.set_title("lightning only: recall against state size", fontsize=9)
    if lightning:
        right.legend(fontsize=7)
    right.grid(alpha=0.3)
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7)
    return finish_figure(fig, path, rect=(0, 0.035 * ((len(labels) + 1) // 2) * 4.2 / fig.get_figheight(), 1, 1))


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
    tasks = {(a["recipe"]["seq_len"], tuple(a["recipe"]["pair_choices"])) for a in summary["arms"].values()}
    one_task = len(tasks) == 1
    task = f"T={recipe['seq_len']}, P from {recipe['pair_choices']}" if one_task else "T and P per label"
    title = (f"MQAR, {task}, vocab {recipe['vocab']}" + (f", {first['steps']} steps" if one_task else "")
             + f", {first.get('device')}")
    table = key_matching(rows)
    learned = capacity(rows)
    hybrid = {"summary": summary["arms"], "key_matching": table, "capacity": learned,
              "raw": [r for r in rows if r["kind"] == "final"]}
    with open(os.path.join(results_dir, f"hybrid_ablation_{size}.json"), "w") as f:
        json.dump(hybrid, f, indent=1)
    with open(os.path.join(results_dir, f"length_extrapolation_{size}.json"), "w") as f:
        json.dump({"summary": summary["lengths"], "raw": [r for r in rows if r["kind"] == "length"]}, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        plot_hybrid(summary, os.path.join(results_dir, f"hybrid_ablation_{size}.png"), title)
        plot_lengths(summary, os.path.join(results_dir, f"length_extrapolation_{size}.png"),
                     f"trained at T={recipe['seq_len']}: recall at longer rows" if one_task else
                     "recall at longer rows (x: evaluation length / each group's training length)")
        if probed_past_training(learned):
            plot_capacity(learned, os.path.join(results_dir, f"capacity_{size}.png"),
                          "MQAR recall of the members that matched keys, at and past the training length and P")
        plot_key_matching(table, os.path.join(results_dir, f"key_matching_{size}.png"),
                          f"MQAR, {task}: seeds whose recall at the smallest P passed (1 + 1/P) / 2")
    except ImportError:
        pass
    for name, arm in summary["arms"].items():
        cells = ", ".join(f"P={p}: {100 * v['mean']:.1f}±{100 * v['std']:.1f}%"
                          for p, v in arm["accuracy_by_pairs"].items())
        print(f"{name:6s} lr {arm['best_lr']:g} steps {arm['steps']} loss {arm['final_loss_at_best_lr']:.3f} {cells}")
    for t in table:
        print(f"{t['label']:28s} lr {t['lr']:g}: keys matched on {t['matched']} of {len(t['seeds'])} seeds "
              f"(steps {[s for s in t['matched_keys_at'] if s is not None]})")
    return summary
