"""Continuous batching: a scheduler thread that keeps a fixed set of decode slots busy.

Each turn of the loop does, in order:
  1. drop cancelled and timed-out requests (waiting, prefilling or decoding);
  2. admission, one device call at most: ONE prefill chunk of the group being prefilled (a group is up to
     `prefill_batch` waiting requests prefilled together in a P-row cache, left-padded to the same length), or, once
     the group is prefilled, insert its rows into free slots, as many as the cache has room for every row's
     remaining tokens (the shared cache index is first moved so that the earliest live row starts at slot 0:
     `shift_slots`; a request whose prompt plus output fills the whole context therefore always fits once the
     batch is empty); so a long prompt never stalls the running batch for more than one chunk per decode call;
  3. launch one decode call of `decode_steps` (K) steps for every slot (steps.decode_steps: sampling, stop ids and
     length are applied on the device; no step of it reads back to the host, so dispatch returns at once) from the
     decode thread, and meanwhile read what came before it, in order: prefilled groups' first tokens
     and the previous call's tokens go to their requests (stop strings, streaming); slots of ended requests are
     freed. A request ended on the host (a stop string) was drawn for in the call already launched too: those
     tokens are discarded, and their routing counts taken back. No call is launched when admission moved this turn
     and the requests coming in are at least as many as the rows decoding, or any come in while no row has been
     in a decode call yet: a wave of requests, its late arrivals included, then enters in prefill calls back to
     back and decodes in step (a late row joining one call later would need one more call for its last tokens).
     While no call was launched, a group's first tokens still on the device are not waited for as long as more
     requests can be admitted: the next group's admission goes first (read later, they are the same tokens).

A prompt is left-padded to a multiple of BUCKET and prefilled in chunks whose lengths are powers of two, groups have
a power-of-two number of rows (a short group repeats its first prompt), so only a handful of step shapes are ever
compiled (`warm_up` compiles them). A group takes waiting requests in order while their padded lengths are within a
factor 2 of each other. Rows of one decode batch share the model's expert_threshold: a request with another threshold
waits until the batch has drained (first come, first served).

Text is decoded incrementally (`m1jax.serve.job.TokenOutput`, which the batcher extends).

Requests come in through `submit` (a bounded queue: QueueFull when full) and go out through their `on_event`
callback (called on the scheduler thread: "tokens" events, one per request per decode call, then one "done") and
`Job.done` (a threading.Event).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import gc
import itertools
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from m1jax.inference.cache import init_cache
from m1jax.inference.generate import model_with_threshold
from m1jax.model import M1ForCausalLM
from m1jax.serve import admission, steps
from m1jax.serve.admission import BUCKET, chunk_lengths, group_rows  # noqa: F401 - BUCKET: API
from m1jax.serve.job import Job, QueueFull, TokenOutput, sampling_mode  # noqa: F401 - Job, QueueFull: API
from m1jax.serve.steps import Slots

DECODE_STEPS = 8  # decode steps per device call (the server's --decode-steps)
PREFILL_BATCH = 8  # requests prefilled together (the server's --prefill-batch)


@dataclasses.dataclass
class _Group:
    """Requests prefilled together: row j < len(jobs) is jobs[j], the rows after it repeat row 0 (padding)."""
    jobs: list[Job]
    threshold: float | None
    window: np.ndarray  # (P, L + 1) int32, left-padded prompts, then a column of 0 (a chunk's next tokens: one slice)
    chunks: list[int]
    sampling: tuple  # device (temperature, top_k, top_p, bias, keys, stop), one row each
    mode: str  # sample_rows's mode for the rows (their first tokens)
    with_logprobs: bool  # prompt log-probs of some row
    position: int = 0
    chunk_index: int = 0
    counts: Any = None
    calls: Any = None
    scores: list = dataclasses.field(default_factory=list)
    logits: Any = None
    first: Any = None  # device (P,) first tokens once prefilled
    pending: list[int] = dataclasses.field(default_factory=list)  # rows waiting for a slot

    @property
    def padded(self) -> np.ndarray:
        """(P, L) int32: the left-padded prompts."""
        return self.window[:, :-1]

    @property
    def rows(self) -> int:
        return self.window.shape[0]


@dataclasses.dataclass
class _Call:
    """A decode call launched: a future of its (slots, Drawn), the request of each slot when it started, its variant."""
    future: concurrent.futures.Future
    jobs: list[Job | None]
    want_logprobs: bool


@dataclasses.dataclass
class _FirstTokens:
    """A prefilled group's first tokens (group.first) and their scores on the device, read in turn with the calls."""
    group: _Group
    scores: Any


class Batcher(TokenOutput):
    """Continuous batching over `max_batch` slots of a cache of `max_context` slots (prompt + output per request).

    decode_text(ids) -> str turns completion ids into text (for stop strings and streamed deltas). decode_steps:
    decode steps per device call (K); prefill_batch: requests prefilled together (P, at most). With a mesh the
    steps run under jax.set_mesh(mesh) (parameters already placed with m1jax.sharding.shard_params).
    """

    def __init__(self, model: M1ForCausalLM, params: Any, decode_text: Callable[[list[int]], str], *,
                 max_batch: int = 64, max_context: int = 4096, chunk_size: int = 512, max_queue: int = 256,
                 decode_steps: int = DECODE_STEPS, prefill_batch: int = PREFILL_BATCH, metrics: Any = None,
                 mesh: Any = None):
        for name, value in (("max_batch", max_batch), ("max_context", max_context), ("chunk_size", chunk_size),
                            ("max_queue", max_queue), ("decode_steps", decode_steps),
                            ("prefill_batch", prefill_batch)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if chunk_size < BUCKET or chunk_size & (chunk_size - 1):
            raise ValueError(f"chunk_size must be a power of two >= {BUCKET}, got {chunk_size}")
        if max_context % BUCKET:
            raise ValueError(f"max_context must be a multiple of {BUCKET}, got {max_context}")
        self.model, self.params, self.decode_text = model, params, decode_text
        self.config = model.config
        self.max_batch, self.max_context = max_batch, max_context
        self.chunk_size, self.max_queue = chunk_size, max_queue
        self.decode_steps, self.prefill_batch = decode_steps, min(prefill_batch, max_batch)
        self.metrics, self.mesh = metrics, mesh
        self._models: dict[float | None, M1ForCausalLM] = {}
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._ids = itertools.count(1)
        self._stopping = False
        self._thread: threading.Thread | None = None
        # decode calls are dispatched from a thread of their own (module docstring, step 3)
        self._device = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="m1jax-decode")
        self._pending: concurrent.futures.Future | None = None
        self.admissions = 0  # prefill chunks launched and groups' rows inserted, all told
        self._reset_device_state()

    # ----- device state -----
    def _reset_device_state(self) -> None:
        cfg, batch = self.config, self.max_batch
        layers_experts = (batch, cfg.num_layers, cfg.num_experts)
        self.slots = Slots(cache=init_cache(cfg, batch, self.max_context, np.zeros(batch, np.int32),
                                            policy=self.model.policy),
                           last=jnp.zeros((batch,), jnp.int32), live=jnp.zeros((batch,), bool),
                           steps=jnp.zeros((batch,), jnp.int32),
                           keys=jnp.zeros((batch,) + jax.random.key_data(jax.random.key(0)).shape, jnp.uint32),
                           temperature=jnp.zeros((batch,), jnp.float32),
                           top_k=jnp.full((batch,), cfg.vocab_size, jnp.int32), top_p=jnp.ones((batch,), jnp.float32),
                           counts=jnp.zeros(layers_experts, jnp.float32), calls=jnp.zeros(layers_experts, jnp.float32),
                           bias=jnp.zeros((batch, cfg.vocab_size), jnp.float32),
                           stop=jnp.zeros((batch, cfg.vocab_size), bool), remaining=jnp.zeros((batch,), jnp.int32))
        self.row_caches: dict[int, Any] = {}  # one P-row prefill cache per group size
        self.active: list[Job | None] = [None] * self.max_batch
        self.index = 0
        self.start = [0] * self.max_batch
        self.drawn = [0] * self.max_batch  # tokens a slot's request will have drawn once the launched calls end
        self.prefilling: _Group | None = None
        self.batch_threshold: float | None = None
        self.in_flight: collections.deque[_Call | _FirstTokens] = collections.deque()

    def _model(self, threshold: float | None) -> M1ForCausalLM:
        if threshold not in self._models:
            self._models[threshold] = model_with_threshold(self.model, threshold)
        return self._models[threshold]

    @property
    def slots(self) -> Slots:
        """The running batch, once the decode call in flight (if any) has been dispatched; re-raises its failure."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._slots = pending.result()[0]
        return self._slots

    @slots.setter
    def slots(self, value: Slots) -> None:
        self._pending = None
        self._slots = value

    # ----- public -----
    def start_thread(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="m1jax-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every submitted request, then end the scheduler thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._device.shutdown(wait=True)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def busy_slots(self) -> int:
        return sum(job is not None for job in self.active)

    def check(self, job: Job) -> None:
        """Raise ValueError naming the field when the job cannot run on this batcher (else set job.prompt_array)."""
        if not job.prompt_ids:
            raise ValueError("prompt_ids is empty")
        need = len(job.prompt_ids) + job.max_new_tokens
        if need > self.max_context:
            raise ValueError(f"the prompt ({len(job.prompt_ids)} tokens) + max_new_tokens ({job.max_new_tokens}) = "
                             f"{need} exceeds the server's context of {self.max_context} tokens")
        if job.max_new_tokens < (0 if job.prompt_logprobs else 1):
            raise ValueError(f"max_new_tokens must be >= 1, got {job.max_new_tokens}")
        if isinstance(job.top_logprobs, bool) or not isinstance(job.top_logprobs, int) or \
                not 0 <= job.top_logprobs <= steps.TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer in [0, {steps.TOP_LOGPROBS}], got {job.top_logprobs!r}")
        ids = admission.prompt_array(job.prompt_ids)
        bad = [i for i in job.prompt_ids if not 0 <= i < self.config.vocab_size] if ids is None else \
            ids[(ids < 0) | (ids >= self.config.vocab_size)][:5].tolist()
        if bad:
            raise ValueError(f"prompt ids {bad[:5]} are outside [0, vocab_size={self.config.vocab_size})")
        bad = [i for i in (job.logit_bias or {}) if not 0 <= i < self.config.vocab_size]
        if bad:
            raise ValueError(f"logit_bias ids {bad[:5]} are outside [0, vocab_size={self.config.vocab_size})")
        job.prompt_array = None if ids is None else ids.astype(np.int32)

    def submit(self, job: Job) -> Job:
        self.check(job)
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (the bound is {self.max_queue})")
            job.id = next(self._ids)
            job.arrival = time.perf_counter()
            self._waiting.append(job)
            self._cond.notify_all()
        return job

    def run_until_idle(self) -> None:
        """Drive the loop on the calling thread until nothing is left (for tests and benchmarks without a thread)."""
        while self._has_work():
            self._turn()

    def warm_up(self, prompt_length: int) -> None:
        """Compile the steps a prompt of this length meets: every group size, the four decode variants (log-probs
        and routing statistics, each on or off) greedy, the drawn token's log-prob alone (top_logprobs 0), and the
        OpenAI routes' variant (neither) with draws and with top-p (steps.decode_steps's sampling modes; the rarer
        combinations compile on first use). Runs on the calling thread, before start_thread. Then collects garbage and
        freezes every object alive (gc.freeze, process-wide): the libraries' and the model's objects leave the
        collector's view, so a full pass no longer stalls the scheduler for tens of milliseconds at random (84 ms a
        pass with jax, flax and m1jax imported, 0.005 after)."""
        length = max(1, min(prompt_length, self.max_context - 2))
        admission.warm_seed_keys(self.prefill_batch)
        variants = [dict(want_logprobs=lp, want_routing=rt) for rt in (True, False) for lp in (False, True)] + [
            dict(want_logprobs=True, want_routing=False, top_logprobs=0), dict(want_routing=False, temperature=1.0),
            dict(want_routing=False, temperature=1.0, top_p=0.9)]
        for size in sorted({group_rows(n, self.prefill_batch) for n in range(1, self.prefill_batch + 1)}):
            for settings in variants:  # log-probs, routing, sampling
                jobs = [self.submit(Job([0] * length, 2, **settings)) for _ in range(size)]
                self.run_until_idle()
                failed = [job.error for job in jobs if job.error is not None]
                if failed:
                    raise RuntimeError(f"warm-up failed: {failed[0]}")
        gc.collect()
        gc.freeze()

    # ----- the loop -----
    def _has_work(self) -> bool:
        return bool(self._waiting) or self.prefilling is not None or self.busy_slots > 0 or bool(self.in_flight)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._has_work() and not self._stopping:
                    self._cond.wait(0.5)
                if self._stopping and not self._has_work():
                    return
            try:
                self._turn()
            except Exception as error:  # a failure of the shared batch: fail its requests, keep serving
                for job in [j for j in self.active if j is not None]:
                    self._fail(job, f"decode failed: {error!r}")
                groups = [item.group for item in self.in_flight if isinstance(item, _FirstTokens)]
                for group in groups + ([self.prefilling] if self.prefilling is not None else []):
                    for job in group.jobs:
                        if not job.done.is_set():
                            self._fail(job, f"prefill failed: {error!r}")
                self._reset_device_state()

    def _turn(self) -> None:
        if self.mesh is None:
            return self._step_all()
        with jax.set_mesh(self.mesh):
            return self._step_all()

    def _step_all(self) -> None:
        self._drop_cancelled()
        admissions = self.admissions
        if self.prefilling is None:
            self._begin_group()
        elif self.prefilling.first is None:
            self._prefill_step()
        else:
            self._try_insert()
        # no call in which every row has surely ended by its length (it would only hold back the next admissions),
        # nor one of a half-empty batch while a wave of requests is coming in (module docstring, step 3)
        live = sum(job is not None and self.drawn[b] < job.max_new_tokens for b, job in enumerate(self.active))
        coming = self._coming() if self.admissions > admissions else 0
        fresh = coming and all(self.drawn[b] == 1 for b, job in enumerate(self.active) if job is not None)
        launched = live > 0 and not (coming >= live or fresh)
        if launched:
            self._launch()
        # keep one decode call in flight: read what came before it (first tokens of prefilled groups, decode calls)
        while self.in_flight and (len(self.in_flight) > 1 or not launched):
            item = self.in_flight[0]
            if not launched and isinstance(item, _FirstTokens) and self._can_admit() and not self._ready(item):
                break  # admit the next group first; these tokens are read in a later turn
            self.in_flight.popleft()
            self._read_first(item) if isinstance(item, _FirstTokens) else self._read(item)
        if self.metrics is not None:
            self.metrics.observe_batcher(self.queue_depth, self.busy_slots, self.max_batch)

    def _can_admit(self) -> bool:
        """Whether the next turn has admission work: a chunk of the group being prefilled, or a new group (waiting
        requests, a free slot, the batch's expert_threshold)."""
        group = self.prefilling
        if group is not None:
            return group.first is None
        return bool(self._waiting) and None in self.active and not (
            self.busy_slots and self._waiting[0].expert_threshold != self.batch_threshold)

    @staticmethod
    def _ready(record: "_FirstTokens") -> bool:
        """Whether a group's first tokens are computed (reading them would not wait for the device)."""
        return record.group.first.is_ready()

    def _coming(self) -> int:
        """Requests on their way into the batch: the prefilling group's rows not yet in a slot, and the waiting
        requests that the other free slots can take."""
        group = self.prefilling
        rows = 0 if group is None else len(group.pending) if group.first is not None else len(group.jobs)
        return rows + min(len(self._waiting), max(self.active.count(None) - rows, 0))

    def _drop_cancelled(self) -> None:
        now = time.perf_counter()
        expired = lambda j: j.cancelled.is_set() or (j.timeout is not None and now - j.arrival > j.timeout)
        for job in [j for j in self._waiting if expired(j)]:
            with self._cond:
                self._waiting.remove(job)
            self._end_cancelled(job)
        group = self.prefilling
        if group is not None:
            for j, job in enumerate(group.jobs):
                if not job.done.is_set() and expired(job):
                    if j in group.pending:
                        group.pending.remove(j)
                    self._end_cancelled(job)
            if all(job.done.is_set() for job in group.jobs):
                self.prefilling = None
        gone = [b for b, job in enumerate(self.active) if job is not None and expired(job)]
        if gone:
            self._release(gone)
            for b in gone:
                job, self.active[b] = self.active[b], None
                self._end_cancelled(job)

    def _end_cancelled(self, job: Job) -> None:
        if job.cancelled.is_set():
            self._finish(job, "cancelled")
        else:
            self._fail(job, f"the request timed out after {job.timeout} s", status=504)

    # ----- prefill, a group of requests at a time -----
    def _begin_group(self) -> None:
        free = self.active.count(None)
        if not self._waiting or not free:
            return
        head = self._waiting[0]
        if self.busy_slots and head.expert_threshold != self.batch_threshold:
            return  # wait until the batch has drained
        with self._cond:
            jobs = [self._waiting.popleft()
                    for _ in range(admission.group_size(self._waiting, min(free, self.prefill_batch)))]
        now = time.perf_counter()
        for job in jobs:
            job.times["prefill"] = now
        rows = group_rows(len(jobs), self.prefill_batch)
        window, starts = admission.padded_prompts(jobs, rows, extra=1)
        try:
            layout, packed, mode = admission.host_settings(jobs, rows, self.config.vocab_size, starts)
            if rows not in self.row_caches:
                self.row_caches[rows] = init_cache(self.config, rows, self.max_context, policy=self.model.policy)
            # one device call: the cache reset for the rows' starts and the rows' settings, from one array
            self.row_caches[rows], sampling = steps.JITTED["admit"](self.config.vocab_size, layout,
                                                                    self.row_caches[rows], packed)
            group = _Group(jobs, head.expert_threshold, window, chunk_lengths(window.shape[1] - 1, self.chunk_size),
                           sampling, mode, any(job.prompt_logprobs for job in jobs))
        except Exception as error:
            self.row_caches.pop(rows, None)
            for job in jobs:
                self._fail(job, f"prefill failed: {error!r}")
            return
        self.prefilling = group
        self._prefill_step()

    def _prefill_step(self) -> None:
        group = self.prefilling
        try:
            self._run_chunk(group)
        except Exception as error:
            self.prefilling = None
            self.row_caches.pop(group.rows, None)
            live = [job for job in group.jobs if not job.done.is_set()]
            if len(group.jobs) > 1 and group.first is None:  # retry each request alone: only the culprit fails
                with self._cond:
                    for job in reversed(live):
                        job.solo = True
                        self._waiting.appendleft(job)
                return
            for job in live:
                self._fail(job, f"prefill failed: {error!r}")

    def _run_chunk(self, group: _Group) -> None:
        size = group.chunks[group.chunk_index]
        tokens = group.window[:, group.position:group.position + size + 1]  # the ids and the next token of each
        cache, logits, (counts, calls), extra = steps.JITTED["prefill"](
            self._model(group.threshold), group.with_logprobs, self.params, self.row_caches[group.rows], tokens)
        self.row_caches[group.rows] = cache
        self.admissions += 1
        group.counts = counts if group.counts is None else group.counts + counts
        group.calls = calls if group.calls is None else group.calls + calls
        group.position += size
        group.chunk_index += 1
        if extra is not None:
            group.scores.append(extra)  # on the device: read with the first tokens
        if group.position < group.window.shape[1] - 1:
            return
        # the whole prompts are in: the first tokens
        want = any(job.want_logprobs for job in group.jobs)
        temperature, top_k, top_p, bias, keys, _ = group.sampling
        group.first, scores = steps.JITTED["first"](want, group.mode, logits, temperature, top_k, top_p, bias, keys)
        # read later, in turn with the decode calls (no wait here). A row that needs no second token takes no slot;
        # one that ends on its first token (a stop id or string) gives its slot back when that token is read.
        group.pending = [j for j, job in enumerate(group.jobs) if not job.done.is_set() and job.max_new_tokens > 1]
        self.in_flight.append(_FirstTokens(group, scores))
        self._try_insert()

    def _read_first(self, record: "_FirstTokens") -> None:
        """Give each request of a prefilled group its first token; end those that it finishes."""
        group = record.group
        first, scores, counts, calls, prompt = jax.device_get((group.first, record.scores, group.counts, group.calls,
                                                              group.scores))
        admission.prompt_scores(group.jobs, prompt, group.window.shape[1] - 1)
        now = time.perf_counter()
        for j, job in enumerate(group.jobs):
            if job.done.is_set():
                continue
            job.times["first"] = now
            if job.max_new_tokens == 0:
                job.finish_reason = "length"
            else:
                t = job.top_logprobs
                score = (float(scores[0][j]), scores[1][j][:t].tolist(), scores[2][j][:t].tolist()) \
                    if job.want_logprobs else None
                if not self._accept(job, int(first[j]), score):
                    continue
            if j in group.pending:
                group.pending.remove(j)
            elif job in self.active:  # inserted already: its slot's later tokens are never read
                b = self.active.index(job)
                self._release([b])
                self.active[b] = None
            self._routing_from(job, counts[j], calls[j])
            self._finish(job, job.finish_reason)
        if self.prefilling is group and not group.pending:
            self.prefilling = None

    # ----- insert -----
    def _try_insert(self) -> None:
        group = self.prefilling
        if group.pending and not (self.busy_slots and group.threshold != self.batch_threshold):
            self._insert_rows(group)
        if not group.pending:
            self.prefilling = None

    def _insert_rows(self, group: _Group) -> None:
        """Insert the group's pending rows, in order, as many as free slots and the cache's room allow."""
        free = [b for b, job in enumerate(self.active) if job is None]
        live = [b for b, job in enumerate(self.active) if job is not None]
        lowest = min((self.start[b] for b in live), default=self.index)
        # where the live rows end (before a shift)
        live_end = max((self.start[b] + len(self.active[b].prompt_ids) + self.active[b].max_new_tokens for b in live),
                       default=None)
        pending = group.pending[:len(free)]
        count, new_index = admission.rows_that_fit(
            [len(group.jobs[j].prompt_ids) for j in pending], [group.jobs[j].max_new_tokens for j in pending],
            self.index - lowest, None if live_end is None else live_end - self.index, self.max_context)
        if not count:
            return
        chosen = pending[:count]
        delta = new_index - self.index
        placement = np.zeros((2, group.rows), np.int32)  # the slot of each row (B: out of range, not now), remaining
        placement[0] = self.max_batch
        placement[0, chosen] = free[:count]
        placement[1, chosen] = [group.jobs[j].max_new_tokens - 1 for j in chosen]
        try:
            if delta:
                self.slots = steps.JITTED["shift"](self.slots, np.int32(delta))
                self.index += delta
                self.start = [s + delta for s in self.start]
            temperature, top_k, top_p, bias, keys, stop = group.sampling
            self.slots = steps.JITTED["insert"](self.slots, self.row_caches[group.rows], placement, group.first,
                                                keys, temperature, top_k, top_p, bias, stop, group.counts, group.calls)
        except Exception as error:
            self.prefilling = None
            for j in group.pending:
                self._fail(group.jobs[j], f"insert failed: {error!r}")
            raise
        for j, b in zip(chosen, free):
            self.start[b] = self.index - len(group.jobs[j].prompt_ids)
            self.drawn[b] = 1  # its first token, drawn from the prefill
            self.active[b] = group.jobs[j]
        del group.pending[:count]  # the chosen rows lead the pending ones
        self.admissions += 1
        self.batch_threshold = group.threshold

    # ----- decode: one call in flight while the host reads the one before -----
    def _launch(self) -> None:
        """Start a decode call of K steps (asynchronously: it runs while the host reads the previous call)."""
        tops = [job.top_logprobs for job in self.active if job is not None and job.want_logprobs]
        logprobs = None if not tops else steps.TOP_LOGPROBS if max(tops) else 0  # two variants: top-20 or none
        routing = any(job is not None and job.want_routing for job in self.active)
        future = self._device.submit(steps.JITTED["decode"], self._model(self.batch_threshold), logprobs,
                                     self.decode_steps, self.params, self.slots, with_routing=routing,
                                     sampling=sampling_mode(self.active, self.config.vocab_size))
        self._pending = future
        self.index += self.decode_steps  # the device's index moves by K whatever happens in the call
        self.drawn = [n + self.decode_steps for n in self.drawn]
        self.in_flight.append(_Call(future, list(self.active), logprobs is not None))

    def _read(self, call: _Call) -> None:
        """Give each request its new tokens of a finished call, in order, and free the slots of those that ended."""
        d = call.future.result()[1]
        tokens, emitted, logp, top_ids, top_logp = jax.device_get((d.tokens, d.emitted, d.logp, d.top_ids,
                                                                   d.top_logp))
        ended: list[tuple[int, int]] = []  # (slot, the step of its request's last token)
        steps_live = np.where(emitted.all(0), emitted.shape[0], emitted.argmin(0)).tolist()  # leading live steps
        columns = tokens.T.tolist()
        for b, job in enumerate(call.jobs):
            if job is None or job.done.is_set():  # ended before (its tokens in this call are discarded)
                continue
            n = steps_live[b]
            t = job.top_logprobs  # the call's variant may hold more alternatives (another row's)
            scores = list(zip(logp[:n, b].tolist(), top_ids[:n, b, :t].tolist(), top_logp[:n, b, :t].tolist())) if (
                call.want_logprobs and job.want_logprobs) else None
            end = self._accept_tokens(job, columns[b][:n], scores)
            if end is not None:
                ended.append((b, end))
            elif n < emitted.shape[0]:
                raise RuntimeError(f"slot {b} stopped on the device but its request did not end")
        if ended:
            self._end_rows(call, ended, emitted)

    def _end_rows(self, call: _Call, ended: list[tuple[int, int]], emitted: np.ndarray) -> None:
        """Free the slots of requests that ended in `call`, with their routing counts: the counts after that call,
        less the steps of the call that ran after a request's last token (after a stop string found here, the device
        went on drawing for it). Only that call's outputs are read: nothing waits for the call launched since."""
        slots = [b for b, _ in ended]
        self._release(slots)
        d = call.future.result()[1]
        counts, calls = jax.device_get((d.counts, d.calls))
        after = [(b, i) for b, i in ended if i + 1 < self.decode_steps and emitted[i + 1, b]]
        if after:
            step_counts, step_calls = jax.device_get((d.step_counts, d.step_calls))
            counts, calls = counts.copy(), calls.copy()
            for b, i in after:
                counts[b] -= step_counts[i + 1:, b].sum(0)
                calls[b] -= step_calls[i + 1:, b].sum(0)
        for b in slots:
            job, self.active[b] = self.active[b], None
            self._routing_from(job, counts[b], calls[b])
            self._finish(job, job.finish_reason)

    def _release(self, slots: list[int]) -> None:
        rows = np.zeros((self.max_batch,), bool)
        rows[slots] = True
        self.slots = steps.JITTED["release"](self.slots, rows)

    @staticmethod
    def _routing_from(job: Job, counts, calls) -> None:
        if not job.want_routing:  # its decode steps may not have counted: no routing log
            return
        job.counts = np.rint(np.asarray(counts)).astype(np.int64)
        job.calls = np.rint(np.asarray(calls)).astype(np.int64)
