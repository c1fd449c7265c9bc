"""The comparison's runs read back from the exports of several run.py invocations (`--phase report`).

Each (algorithm, seed) run of `--phase compare` is complete in one process, and its process appends to its --export
directory every step's record (records.jsonl, tagged phase/algo/seed), the run's clipped-token lines at its end
(tokens.jsonl) and a "timing" line when it has finished (events.jsonl); the compare phase also leaves there a copy of
the setup (<stem>_setup.json) and a "compare" line naming the pretrained checkpoint (its sha256). From those alone
`collect` rebuilds what a single `--phase compare` over the same runs hands to `summarise` and `write_results`: the
runs' metrics.jsonl rows, in the same order, and their token lines.
"""
from __future__ import annotations

import json
import os

import numpy as np

TAGS = ("phase", "algo", "seed")  # run_one's tags that metrics.jsonl lacks ("lr" is in both: the schedule's rate)
TIMINGS = ("step_seconds", "rollout_seconds")  # differ between two executions of the same run


class RecordsError(ValueError):
    """The exports cannot make a paired comparison (missing, unfinished, conflicting or mixed runs)."""


def _lines(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_export(directory: str, setup_name: str) -> tuple[dict, dict | None, list[dict]]:
    """({(algo, seed): {"records", "tokens", "seconds"}}, the setup or None, the events) of one export directory;
    only the comparison's runs (phase "compare"). A step recorded twice (a run resumed into the same directory) keeps
    its later line; "seconds" is None for a run without its end-of-run timing line (it did not finish)."""
    if not os.path.isdir(directory):
        raise RecordsError(f"{directory}: no such directory")
    runs = {}
    for name in ("records", "tokens"):
        for line in _lines(os.path.join(directory, name + ".jsonl")):
            if line.get("phase") == "compare":
                run = runs.setdefault((line["algo"], int(line["seed"])), {"records": {}, "tokens": {}, "seconds": None})
                drop = TAGS if name == "records" else TAGS + ("lr",)
                run[name][line["step"]] = {k: v for k, v in line.items() if k not in drop}
    events = _lines(os.path.join(directory, "events.jsonl"))
    for event in events:
        if event["log"] == "timing" and (event["algo"], int(event["seed"])) in runs:
            runs[(event["algo"], int(event["seed"]))]["seconds"] = float(event["seconds"])
    setup_path = os.path.join(directory, setup_name)
    setup = None
    if os.path.exists(setup_path):
        with open(setup_path) as f:
            setup = json.load(f)
    for run in runs.values():
        run["records"] = [run["records"][s] for s in sorted(run["records"])]
        run["tokens"] = [run["tokens"][s] for s in sorted(run["tokens"])]
    return runs, setup, events


def _finished(run: dict, cut: int | None = None) -> str | None:
    """Why the run is not a complete run, or None. With cut: why its first `cut` steps are not whole, or None."""
    steps = [r["step"] for r in run["records"]]
    if cut is not None and steps[:cut] == list(range(1, cut + 1)):
        return None
    if run["seconds"] is None or not run["tokens"]:
        return f"did not finish ({len(steps)} steps recorded, no end-of-run lines)"
    if steps != list(range(1, len(steps) + 1)):
        return f"has steps {steps[0]}..{steps[-1]} with gaps or a late start (resumed from a run of another call?)"
    return None


def _cut(run: dict, steps: int) -> dict:
    """The run's first `steps` steps: records and token lines of later steps dropped; seconds summed over the kept
    steps when the run has no end-of-run timing (it was stopped, e.g. by a device call's time limit)."""
    records = [r for r in run["records"] if r["step"] <= steps]
    seconds = run["seconds"] if len(run["records"]) == steps and run["seconds"] is not None else \
        sum(float(r.get("step_seconds", 0.0)) for r in records)
    return {"records": records, "tokens": [t for t in run["tokens"] if t["step"] <= steps], "seconds": seconds,
            "stopped": run["seconds"] is None}


def _same(a: dict, b: dict) -> bool:
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]  # noqa: E731
    return strip(a["records"]) == strip(b["records"]) and a["tokens"] == b["tokens"]


def collect(directories: list[str], setup_name: str, algos, seeds=None, steps: int | None = None,
            chosen: dict | None = None) -> dict:
    """The paired comparison over algos x seeds (seeds None: every seed found) from the export directories (each
    "DIR" or "DIR=ALGO+ALGO": only those algorithms' runs of DIR, e.g. to pair a diagnostic run with others).

    Returns {"runs": {(algo, seed): metrics rows} seed-major, "tokens": tagged token lines algo-major (the order of
    `--phase compare`), "setup": the exported setup (None when no directory has one), "lrs": the rates per
    algorithm, "seconds": the runs' summed time, "seeds", "sources": {(algo, seed): directory}, "notes"}.
    chosen: the setup's rates when no directory holds a setup. Raises RecordsError when a seed lacks an algorithm,
    a run did not finish, two directories hold different executions of one run, the runs came from different
    checkpoints or setups, an algorithm ran at two rates, or (with steps) a run has fewer steps. steps: every run's
    first `steps` steps are compared (a run stopped after them counts too, without its token lines)."""
    found, unfinished, setups, hashes, notes = {}, {}, [], {}, []
    for directory in directories:
        directory, _, only = directory.partition("=")  # DIR=ALGO+ALGO: only these algorithms' runs of DIR
        runs, setup, events = read_export(directory, setup_name)
        if only:
            runs = {k: v for k, v in runs.items() if k[0] in only.split("+")}
        if setup is not None:
            setups.append((directory, setup))
        for event in events:
            if event["log"] == "compare" and event.get("checkpoint_sha256"):
                hashes.setdefault(event["checkpoint_sha256"], directory)
        for key, run in runs.items():
            why = _finished(run, steps)
            if why is None and steps is not None:
                run = _cut(run, steps)
            if why:
                unfinished[key] = f"{key[0]} seed {key[1]} in {directory} {why}"
            elif key in found:
                if not _same(found[key][1], run):
                    raise RecordsError(f"{key[0]} seed {key[1]} was run in both {found[key][0]} and {directory}, with "
                                       "different records: keep one of the two (leave the other directory out)")
                notes.append(f"{key[0]} seed {key[1]}: identical runs in {found[key][0]} and {directory}, one kept")
            else:
                found[key] = (directory, run)
    if len(hashes) > 1:
        raise RecordsError("the runs started from different pretrained checkpoints: "
                           + "; ".join(f"sha256 {h[:12]} in {d}" for h, d in hashes.items()))
    for (d1, s1), (d2, s2) in zip(setups, setups[1:]):
        for part in ("pretrain", "mismatch"):
            if s1.get(part) != s2.get(part):
                raise RecordsError(f"the setups of {d1} and {d2} differ in {part!r}: runs of different pretrainings")
    seeds = sorted({s for _, s in [*found, *unfinished]}) if seeds is None else list(seeds)
    wanted = [(a, s) for s in seeds for a in algos]
    if not wanted:
        raise RecordsError(f"no runs of --phase compare in {', '.join(directories)}")
    missing = [k for k in wanted if k not in found]
    if missing:
        raise RecordsError(
            "the comparison pairs seeds, and these runs are missing: "
            + ", ".join(unfinished.get(k, f"{k[0]} seed {k[1]}") for k in missing)
            + f" (complete runs found: {', '.join(f'{a} seed {s}' for a, s in sorted(found)) or 'none'}); "
            "run them, or narrow the report with --algos / --seeds")
    notes += [unfinished[k] + ": left out, a complete run is in " + found[k][0] for k in unfinished if k in found]
    extra = sorted(k for k in found if k not in wanted)
    if extra:
        notes.append("left out (not selected): " + ", ".join(f"{a} seed {s}" for a, s in extra))
    runs = {k: found[k][1]["records"] for k in wanted}
    lengths = {k: len(rows) for k, rows in runs.items()}
    if steps is not None and set(lengths.values()) != {steps}:
        raise RecordsError(f"--steps {steps}, but these runs have fewer steps: "
                           + ", ".join(f"{a} seed {s}: {n}" for (a, s), n in lengths.items() if n != steps))
    stopped = [k for k in wanted if found[k][1].get("stopped")]
    if stopped:
        notes.append(f"cut to their first {steps} steps, without token lines (stopped before their end): "
                     + ", ".join(f"{a} seed {s}" for a, s in stopped))
    if len(set(lengths.values())) > 1:
        notes.append("runs of unequal length: " + ", ".join(f"{a} seed {s}: {n}" for (a, s), n in lengths.items()))
    setup = setups[-1][1] if setups else None
    lrs = {k: float(v) for k, v in ((setup or {}).get("sweep", {}).get("chosen") or chosen or {}).items()}
    for algo in algos:
        rates = {(s, float(r["lr"])) for (a, s), rows in runs.items() if a == algo for r in rows}
        values = sorted({lr for _, lr in rates})
        if not np.allclose(values, values[0], rtol=1e-5):
            raise RecordsError(f"{algo} ran at different learning rates: "
                               + ", ".join(f"seed {s}: {lr:g}" for s, lr in sorted(rates)))
        if algo not in lrs or not np.isclose(values[0], lrs[algo], rtol=1e-5):
            notes.append(f"{algo} ran at {values[0]:.3g}, not the setup's {lrs.get(algo)}: the runs' rate is reported")
            lrs[algo] = float(f"{values[0]:.6g}")  # the schedule's float32 rate, as the sweep wrote it
    tokens = [{"algo": a, "seed": s, **line} for a in algos for s in seeds for line in found[(a, s)][1]["tokens"]]
    return {"runs": runs, "tokens": tokens, "setup": setup, "lrs": lrs, "seeds": seeds, "notes": notes,
            "seconds": float(sum(found[k][1]["seconds"] for k in wanted)),
            "sources": {k: found[k][0] for k in wanted}}
