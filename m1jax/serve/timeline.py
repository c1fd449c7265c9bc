"""A timeline of the batcher's scheduler turns (benchmarks/serve.py --timeline): where the wall time of a run goes.

`Timeline(batcher)` wraps, on that one instance (the class is untouched; `detach` restores it), the methods a turn
goes through, and times them with time.perf_counter while recording (between `begin` and `end`). Spans nest:
  turn          Batcher._turn: one scheduler turn; its own time (less the spans inside it) is "other" bookkeeping
  admit         _begin_group: a prefill group formed from the waiting requests (padding, sampling rows, cache reset)
  prefill       _run_chunk: one prefill chunk dispatched (rows, jobs, tokens), the first tokens after the last one
  insert        _insert_rows: a prefilled group's rows put into free slots (shift + insert dispatched)
  launch        _launch: a decode call handed to the decode thread (active rows / slots, K, useful tokens)
  read          _read: a decode call's tokens to their requests (detokenization, stop checks, events, ended rows)
  decode_wait   inside read, first: waiting on the device for that call's tokens (then read only does host work)
  read_first    _read_first: a prefilled group's first tokens to their requests
  prefill_wait  inside read_first, first: waiting on the device for the group's first tokens
and, off the scheduler thread, `dispatch`: the decode thread's dispatch of a launched call (launch to its future's
end), and `gc`: a pass of Python's cyclic garbage collector on any thread (gc.callbacks; it holds the interpreter
lock, so whichever span it falls in waits; counted apart, not as a category). The time between turns is idle (the
scheduler waits for requests, or for the GIL). The waits only block on the arrays that the wrapped method reads next
(jax.block_until_ready), so the engine does what it did.
"""
from __future__ import annotations

import gc
import itertools
import json
import statistics
import time
from typing import Any

import jax

TOKENS, ADMISSION = "host: tokens to requests", "host: admission (group, prefill/insert dispatch)"
# span kind -> the category its own time (less the spans inside it) counts in
CATEGORY = {"decode_wait": "device wait: decode tokens", "prefill_wait": "device wait: prefill first tokens",
            "read": TOKENS, "read_first": TOKENS, "admit": ADMISSION, "prefill": ADMISSION, "insert": ADMISSION,
            "launch": "host: decode launch", "turn": "other (turn bookkeeping)"}
IDLE = "idle (between turns: no work, GIL)"
ORDER = list(dict.fromkeys(CATEGORY.values())) + [IDLE]


def _ids(jobs) -> list[int]:
    return [job.id for job in jobs if job is not None]


class Timeline:
    """Records a batcher's turns while recording: `begin()` (returns the start), the run, `end()`; then `records()`,
    `summary(wave)`, or `write(path, wave, **labels)` (both). `detach()` gives the batcher its own methods back."""

    def __init__(self, batcher: Any):
        self.batcher = batcher
        self.recording = False
        self.t0 = self.t_end = 0.0
        self.events: list[dict] = []
        self.jobs: list[Any] = []  # submitted while recording
        self._open: list[dict] = []  # the scheduler thread's open spans, innermost last
        self._generation = 0
        self._count = itertools.count()
        self._calls: dict[Any, int] = {}  # a decode call's future -> its number in the run
        b = batcher
        drawn = lambda f: (f.tokens, f.emitted, f.logp, f.top_ids, f.top_logp)
        self._names = {
            "_turn": ("turn", lambda: dict(active=b.busy_slots, waiting=b.queue_depth, in_flight=len(b.in_flight)),
                      None, None),
            "_begin_group": ("admit", lambda: dict(waiting=b.queue_depth), None, None),
            "_run_chunk": ("prefill", self._chunk_fields, None, None),
            "_insert_rows": ("insert", lambda g: dict(pending=len(g.pending)),
                             lambda s, g: dict(inserted=s["pending"] - len(g.pending), active=b.busy_slots), None),
            "_launch": ("launch", self._launch_fields, self._launched, None),
            "_read": ("read", lambda call: dict(call=self._calls.get(call.future), _open=[
                          j for j in call.jobs if j is not None and not j.done.is_set()]),
                      lambda s, call: dict(ended=sum(j.done.is_set() for j in s.pop("_open"))),
                      ("decode_wait", lambda call: jax.block_until_ready(drawn(call.future.result()[1])))),
            "_read_first": ("read_first", lambda r: dict(rows=r.group.rows, jobs=len(r.group.jobs)), None,
                            ("prefill_wait", lambda r: jax.block_until_ready(
                                (r.group.first, r.scores, r.group.counts, r.group.calls)))),
        }
        for name, spec in self._names.items():
            setattr(batcher, name, self._wrap(getattr(batcher, name), *spec))
        self._gc_start: float | None = None
        gc.callbacks.append(self._gc)
        submit = batcher.submit

        def submitted(job):
            out = submit(job)
            if self.recording:
                self.jobs.append(job)
            return out
        batcher.submit = submitted

    def detach(self) -> None:
        for name in list(self._names) + ["submit"]:
            self.batcher.__dict__.pop(name, None)
        if self._gc in gc.callbacks:
            gc.callbacks.remove(self._gc)

    def _gc(self, phase: str, info: dict) -> None:
        """gc.callbacks: a collector pass (its generation and objects collected) while recording."""
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self.recording and self._gc_start is not None:
            self.events.append(dict(event="gc", id=next(self._count), parent=None, start=self._gc_start,
                                    end=time.perf_counter(), generation=info["generation"],
                                    collected=info["collected"]))

    # ----- recording -----
    def begin(self) -> float:
        """Start a run's timeline (the previous one is dropped). Returns its start (time.perf_counter)."""
        self._generation += 1
        self.events, self.jobs, self._calls, self._count = [], [], {}, itertools.count()
        self.t0 = time.perf_counter()
        self.recording = True
        return self.t0

    def end(self, t_end: float | None = None) -> None:
        self.recording = False
        self.t_end = time.perf_counter() if t_end is None else t_end

    def _enter(self, kind: str, fields: dict) -> dict:
        parent = self._open[-1] if self._open else None
        span = dict(event=kind, id=next(self._count), parent=None if parent is None else parent["id"],
                    start=time.perf_counter(), **fields)
        span["_inner"], span["_gen"] = 0.0, self._generation
        if parent is not None:
            parent.setdefault("did", []).append(kind)
        self._open.append(span)
        return span

    def _exit(self, span: dict) -> None:
        span["end"] = time.perf_counter()
        self._open.pop()
        seconds = span["end"] - span["start"]
        span["seconds"], span["self_seconds"] = seconds, seconds - span.pop("_inner")
        if self._open:
            self._open[-1]["_inner"] += seconds
        if span.pop("_gen") == self._generation:
            self.events.append(span)

    def _wrap(self, method, kind, before, after, wait):
        def wrapped(*args):
            if not self.recording:
                return method(*args)
            span = self._enter(kind, before(*args) if before else {})
            try:
                if wait is not None:
                    inner = self._enter(wait[0], {})
                    try:
                        wait[1](*args)
                    finally:
                        self._exit(inner)
                return method(*args)
            finally:
                if after is not None:
                    try:
                        span.update(after(span, *args))
                    except Exception as error:  # never hide the method's own outcome
                        span["after_error"] = repr(error)
                self._exit(span)
        return wrapped

    # ----- fields of the spans -----
    def _chunk_fields(self, group) -> dict:
        size = group.chunks[group.chunk_index]
        return dict(rows=group.rows, jobs=len(group.jobs), chunk=size, tokens=group.rows * size,
                    position=group.position, last=group.position + size >= group.padded.shape[1],
                    job_ids=_ids(group.jobs))

    def _launch_fields(self) -> dict:
        b = self.batcher
        useful = sum(min(b.decode_steps, job.max_new_tokens - b.drawn[i]) for i, job in enumerate(b.active)
                     if job is not None and b.drawn[i] < job.max_new_tokens)
        return dict(active=b.busy_slots, slots=b.max_batch, k=b.decode_steps, useful_tokens=useful,
                    job_ids=_ids(b.active))

    def _launched(self, span: dict) -> dict:
        call, number = self.batcher.in_flight[-1], len(self._calls)
        self._calls[call.future] = number
        start, generation = time.perf_counter(), self._generation

        def dispatched(_):
            if generation == self._generation:
                self.events.append(dict(event="dispatch", id=next(self._count), parent=None, thread="decode",
                                        call=number, start=start, end=time.perf_counter()))
        call.future.add_done_callback(dispatched)
        return dict(call=number)

    # ----- output -----
    def records(self) -> list[dict]:
        """The run's events (times in seconds from `begin`, ordered by start) and one "request" record per job."""
        out = []
        for e in sorted(list(self.events), key=lambda e: e["start"]):
            e = {k: v for k, v in e.items() if not k.startswith("_")}
            e["start"], e["end"] = round(e["start"] - self.t0, 6), round(e["end"] - self.t0, 6)
            e["seconds"] = round(e["end"] - e["start"], 6)
            if "self_seconds" in e:
                e["self_seconds"] = round(e["self_seconds"], 6)
            out.append(e)
        rel = lambda t: None if t is None else round(t - self.t0, 6)
        for job in self.jobs:
            out.append(dict(event="request", job=job.id, arrival=rel(job.arrival), prefill=rel(job.times.get(
                "prefill")), first=rel(job.times.get("first")), end=rel(job.times.get("end")),
                tokens=len(job.token_ids)))
        return out

    def write(self, path: str, wave: int | None = None, **labels) -> dict:
        """Append the run's records and its summary (the last line, event "summary") to the JSON-lines file `path`,
        each with `labels`. Returns the summary."""
        summary = self.summary(wave)
        with open(path, "a") as f:
            for record in self.records() + [dict(event="summary", **summary)]:
                f.write(json.dumps({**labels, **record}) + "\n")
        return summary

    def summary(self, wave: int | None = None) -> dict:
        """Seconds per category over the run (spans clipped to [begin, end]), the decode and prefill calls, and with
        `wave` (the clients: each sends its requests one after another), per wave of that many requests (in order of
        arrival): when it came, was prefilled, first decoded, ended, and the gap from the previous wave's last token
        (or the run's start) to its first decode call, with that gap's categories."""
        t0, t1 = self.t0, self.t_end
        events = list(self.events)
        by_id = {e["id"]: e for e in events}
        spans = [e for e in events if e["event"] not in ("dispatch", "gc")]  # the scheduler thread's
        pauses = [e["end"] - e["start"] for e in events if e["event"] == "gc"]

        def categories(a: float, b: float) -> dict:
            out, top = dict.fromkeys(ORDER, 0.0), 0.0
            for e in spans:
                overlap = max(0.0, min(e["end"], b) - max(e["start"], a))
                out[CATEGORY[e["event"]]] += overlap
                parent = by_id.get(e["parent"])
                if parent is None:
                    top += overlap
                else:
                    out[CATEGORY[parent["event"]]] -= overlap
            out[IDLE] = (b - a) - top
            return {k: round(v, 6) for k, v in out.items()}

        of = lambda kind: [e for e in spans if e["event"] == kind]
        launches, prefills = of("launch"), of("prefill")
        ms = lambda s: None if s is None else round(1e3 * s, 3)
        mean = lambda xs: round(statistics.fmean(xs), 4) if xs else None
        arrivals = sorted(e["end"] for e in of("decode_wait"))
        periods = [b - a for a, b in zip(arrivals, arrivals[1:])]
        dispatch = [e["end"] - e["start"] for e in events if e["event"] == "dispatch"]
        out = dict(wall=round(t1 - t0, 6), turns=len(of("turn")), categories=categories(t0, t1),
                   decode_calls=len(launches),
                   occupancy=mean([e["active"] / e["slots"] for e in launches]),
                   useful_occupancy=mean([e["useful_tokens"] / (e["k"] * e["slots"]) for e in launches]),
                   k=launches[0]["k"] if launches else None, slots=self.batcher.max_batch,
                   decode_period_ms_p50=ms(statistics.median(periods)) if periods else None,
                   dispatch_ms_mean=ms(statistics.fmean(dispatch)) if dispatch else None,
                   dispatch_ms_max=ms(max(dispatch)) if dispatch else None,
                   prefill_calls=[(e["rows"], e["jobs"], e["chunk"]) for e in prefills],
                   active_rows=[e["active"] for e in launches],
                   gc=dict(passes=len(pauses), seconds=round(sum(pauses), 6), longest_ms=ms(max(pauses, default=0.0)),
                           full=sum(e["generation"] == 2 for e in events if e["event"] == "gc")), waves=[])
        call_ids = {e["call"]: set(e["job_ids"]) for e in launches}
        tokens_in = [(e["end"], call_ids.get(by_id[e["parent"]]["call"], set())) for e in of("decode_wait")
                     if e["parent"] in by_id]
        jobs = sorted(self.jobs, key=lambda job: job.arrival)
        size = wave or len(jobs) or 1
        rel = lambda t: None if t is None else ms(t - t0)
        previous = None
        for w in range(0, len(jobs), size):
            mine = jobs[w:w + size]
            ids = {job.id for job in mine}
            hit = lambda spans: [e for e in spans if ids & set(e["job_ids"])]
            prefill, decode = hit(prefills), hit(launches)
            ends = [job.times.get("end") for job in mine]
            last = max(ends) if None not in ends else None
            arrived = max((t for t, i in tokens_in if ids & i and (last is None or t <= last)), default=None)
            row = dict(requests=len(mine), arrival_ms=(rel(mine[0].arrival), rel(mine[-1].arrival)),
                       first_prefill_ms=rel(prefill[0]["start"] if prefill else None),
                       prefill_calls=[(e["rows"], e["jobs"], e["chunk"]) for e in prefill],
                       first_decode_ms=rel(decode[0]["start"] if decode else None),
                       decode_calls=len(decode), last_tokens_arrived_ms=rel(arrived), last_token_ms=rel(last),
                       gap_ms=None, gap=None, bubble_ms=None)
            since = t0 if previous is None else previous["last"]
            if decode and since is not None:
                row["gap_ms"] = ms(decode[0]["start"] - since)
                row["gap"] = categories(since, decode[0]["start"]) if decode[0]["start"] > since else None
            if previous is not None and previous["arrived"] is not None and prefill:
                row["bubble_ms"] = ms(prefill[0]["start"] - previous["arrived"])
            out["waves"].append(row)
            previous = dict(last=last, arrived=arrived)
        return out


def summary_table(s: dict, title: str) -> str:
    """The summary as a markdown table and a few lines."""
    wall = s["wall"] or 1e-9
    rows = [f"timeline {title}: wall {s['wall']:.3f} s, {s['turns']} turns, {s['decode_calls']} decode calls of K="
            f"{s['k']} on {s['slots']} slots (mean share of slots active {s['occupancy']}, of K x slots drawing a "
            f"useful token {s['useful_occupancy']}), {len(s['prefill_calls'])} prefill calls",
            "| category | seconds | share |", "|---|---|---|"]
    for name, seconds in s["categories"].items():
        rows.append(f"| {name} | {seconds:.4f} | {seconds / wall:.1%} |")
    rows.append(f"| total | {sum(s['categories'].values()):.4f} | |")
    rows.append(f"decode: tokens off the device every {s['decode_period_ms_p50']} ms (p50 of intervals), dispatch "
                f"on the decode thread {s['dispatch_ms_mean']} ms mean / {s['dispatch_ms_max']} max")
    if "gc" in s:
        g = s["gc"]
        rows.append(f"Python gc: {g['passes']} passes ({g['full']} full), {1e3 * g['seconds']:.1f} ms in all, longest "
                    f"{g['longest_ms']} ms (inside the spans above)")
    short = lambda gap: ", ".join(f"{k.split(' (')[0]} {1e3 * v:.1f}" for k, v in gap.items() if abs(v) >= 5e-5)
    runs: list[list[int]] = []  # [active rows, calls in a row]
    for n in s["active_rows"]:
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    rows.append("active rows of the decode calls in order: " + ", ".join(f"{n} x{c}" if c > 1 else f"{n}"
                                                                          for n, c in runs))
    for i, w in enumerate(s["waves"], 1):
        calls = w["prefill_calls"]
        rows.append(f"wave {i} ({w['requests']} requests): arrived {w['arrival_ms'][0]}-{w['arrival_ms'][1]} ms, "
                    f"first prefill {w['first_prefill_ms']} ms ({len(calls)} calls (rows, jobs, chunk): "
                    f"{', '.join(map(str, calls[:6]))}{' ...' if len(calls) > 6 else ''}), first decode "
                    f"{w['first_decode_ms']} ms ({w['decode_calls']} calls), its last tokens off the device "
                    f"{w['last_tokens_arrived_ms']} ms, last token out {w['last_token_ms']} ms")
        before = f"last token of wave {i - 1}" if i > 1 else "run start"
        if w["gap_ms"] is not None:
            rows.append(f"  {before} -> first decode of wave {i}: {w['gap_ms']} ms" + (
                f" = {short(w['gap'])} (ms)" if w["gap"] else " (the waves overlap)"))
        if w["bubble_ms"] is not None:
            rows.append(f"  wave {i - 1}'s last tokens off the device -> wave {i}'s first prefill dispatched: "
                        f"{w['bubble_ms']} ms" + (" (the device has nothing queued)" if w["bubble_ms"] > 0 else ""))
    return "\n".join(rows)
