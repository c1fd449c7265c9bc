"""Continuous batching: a scheduler thread that keeps a fixed set of decode slots busy.

Each turn of the loop does, in order:
  1. drop cancelled and timed-out requests (waiting, prefilling or decoding);
  2. insert a prefilled request into a free slot, once the cache has room for every row's remaining tokens
     (the shared cache index is first moved so that the earliest live row starts at slot 0: `shift_slots`; a
     request whose prompt plus output fills the whole context therefore always fits once the batch is empty);
  3. otherwise run ONE prefill chunk of the request being prefilled (or start the next waiting request), so a long
     prompt is spread over several turns and never stalls the running batch for more than a chunk;
  4. one decode step for every slot; each live row's token goes to its request (stop ids, stop strings, length).

A prompt is left-padded to a multiple of BUCKET and prefilled in chunks whose lengths are powers of two, so only a
handful of step shapes are ever compiled. Rows of one decode batch share the model's expert_threshold: a request
with another threshold waits until the batch has drained (first come, first served).

Requests come in through `submit` (a bounded queue: QueueFull when full) and go out through their `on_event`
callback (called on the scheduler thread: "token" events, then one "done") and `Job.done` (a threading.Event).
"""
from __future__ import annotations

import collections
import dataclasses
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
from m1jax.serve import steps
from m1jax.serve.steps import Slots

BUCKET = 16  # prompts are left-padded to a multiple of this


class QueueFull(Exception):
    """The waiting queue is at its bound: retry later (HTTP 429)."""


@dataclasses.dataclass
class Job:
    """One generation request. prompt_ids: token ids; max_new_tokens >= 1 (0 only with prompt_logprobs, to score a
    prompt); stop_ids end it (the id is kept in token_ids, not in text); stop_strings end it with the text cut before
    the string. expert_threshold None keeps the model's. prompt_logprobs: compute log p(prompt[j] | prompt[:j])."""
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    expert_threshold: float | None = None
    prompt_logprobs: bool = False
    logit_bias: dict[int, float] | None = None
    timeout: float | None = None
    on_event: Callable[[str, dict], Any] | None = None
    # filled in by the batcher
    id: int = 0
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[tuple[float, list[int], list[float]]] = dataclasses.field(default_factory=list)
    prompt_scores: list[tuple[float, list[int], list[float]] | None] = dataclasses.field(default_factory=list)
    text: str = ""
    sent: str = ""
    finish_reason: str | None = None
    error: str | None = None
    error_status: int = 500
    counts: np.ndarray | None = None
    calls: np.ndarray | None = None
    times: dict[str, float] = dataclasses.field(default_factory=dict)

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def timing_ms(self) -> dict[str, float]:
        t = self.times
        ms = lambda a, b: round(1000 * (t.get(b, t.get(a, 0.0)) - t.get(a, 0.0)), 3) if a in t else 0.0
        return {"queue_ms": round(1000 * (t.get("prefill", self.arrival) - self.arrival), 3),
                "prefill_ms": ms("prefill", "first"), "decode_ms": ms("first", "end")}


@dataclasses.dataclass
class _Prefill:
    job: Job
    threshold: float | None
    padded: np.ndarray  # (Pb,) int32, left-padded prompt
    chunks: list[int]
    position: int = 0
    chunk_index: int = 0
    counts: Any = None
    calls: Any = None
    scores: list = dataclasses.field(default_factory=list)
    logits: Any = None
    first: tuple | None = None
    sampling: tuple | None = None  # the job's (temperature, top_k, top_p, bias) on the device, made once


def chunk_lengths(length: int, chunk_size: int) -> list[int]:
    """A multiple of BUCKET split into powers of two, chunk_size (a power of two >= BUCKET) at most."""
    out, rest = [], length
    size = chunk_size
    while rest:
        while size > rest:
            size //= 2
        out.append(size)
        rest -= size
    return out


class Batcher:
    """Continuous batching over `max_batch` slots of a cache of `max_context` slots (prompt + output per request).

    decode_text(ids) -> str turns completion ids into text (for stop strings and streamed deltas). With a mesh the
    steps run under jax.set_mesh(mesh) (parameters already placed with m1jax.sharding.shard_params).
    """

    def __init__(self, model: M1ForCausalLM, params: Any, decode_text: Callable[[list[int]], str], *,
                 max_batch: int = 64, max_context: int = 4096, chunk_size: int = 512, max_queue: int = 256,
                 metrics: Any = None, mesh: Any = None):
        for name, value in (("max_batch", max_batch), ("max_context", max_context), ("chunk_size", chunk_size),
                            ("max_queue", max_queue)):
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
        self.metrics, self.mesh = metrics, mesh
        self._models: dict[float | None, M1ForCausalLM] = {}
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._ids = itertools.count(1)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._reset_device_state()

    # ----- device state -----
    def _reset_device_state(self) -> None:
        cfg, batch = self.config, self.max_batch
        layers_experts = (batch, cfg.num_layers, cfg.num_experts)
        self.slots = Slots(cache=init_cache(cfg, batch, self.max_context, np.zeros(batch, np.int32)),
                           last=jnp.zeros((batch,), jnp.int32), live=jnp.zeros((batch,), bool),
                           steps=jnp.zeros((batch,), jnp.int32),
                           keys=jnp.zeros((batch,) + jax.random.key_data(jax.random.key(0)).shape, jnp.uint32),
                           temperature=jnp.zeros((batch,), jnp.float32),
                           top_k=jnp.full((batch,), cfg.vocab_size, jnp.int32), top_p=jnp.ones((batch,), jnp.float32),
                           counts=jnp.zeros(layers_experts, jnp.float32), calls=jnp.zeros(layers_experts, jnp.float32),
                           bias=jnp.zeros((batch, cfg.vocab_size), jnp.float32))
        self.row_cache = init_cache(cfg, 1, self.max_context)
        self.active: list[Job | None] = [None] * self.max_batch
        self.index = 0
        self.start = [0] * self.max_batch
        self.prefilling: _Prefill | None = None
        self.batch_threshold: float | None = None

    def _model(self, threshold: float | None) -> M1ForCausalLM:
        if threshold not in self._models:
            self._models[threshold] = model_with_threshold(self.model, threshold)
        return self._models[threshold]

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

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def busy_slots(self) -> int:
        return sum(job is not None for job in self.active)

    def check(self, job: Job) -> None:
        """Raise ValueError naming the field when the job cannot run on this batcher."""
        if not job.prompt_ids:
            raise ValueError("prompt_ids is empty")
        need = len(job.prompt_ids) + job.max_new_tokens
        if need > self.max_context:
            raise ValueError(f"the prompt ({len(job.prompt_ids)} tokens) + max_new_tokens ({job.max_new_tokens}) = "
                             f"{need} exceeds the server's context of {self.max_context} tokens")
        if job.max_new_tokens < (0 if job.prompt_logprobs else 1):
            raise ValueError(f"max_new_tokens must be >= 1, got {job.max_new_tokens}")
        bad = [i for i in job.prompt_ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt ids {bad[:5]} are outside [0, vocab_size={self.config.vocab_size})")
        bad = [i for i in (job.logit_bias or {}) if not 0 <= i < self.config.vocab_size]
        if bad:
            raise ValueError(f"logit_bias ids {bad[:5]} are outside [0, vocab_size={self.config.vocab_size})")

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

    # ----- the loop -----
    def _has_work(self) -> bool:
        return bool(self._waiting) or self.prefilling is not None or self.busy_slots > 0

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
                if self.prefilling is not None:
                    self._fail(self.prefilling.job, f"prefill failed: {error!r}")
                self._reset_device_state()

    def _turn(self) -> None:
        if self.mesh is None:
            return self._step_all()
        with jax.set_mesh(self.mesh):
            return self._step_all()

    def _step_all(self) -> None:
        self._drop_cancelled()
        if self.prefilling is not None and self.prefilling.first is not None:
            self._try_insert()
        elif self.prefilling is not None:
            self._prefill_step()
        elif self._waiting and None in self.active:
            head = self._waiting[0]
            if self.busy_slots == 0 or head.expert_threshold == self.batch_threshold:
                with self._cond:
                    job = self._waiting.popleft()
                self._begin_prefill(job)
        if self.busy_slots:
            self._decode_step()
        if self.metrics is not None:
            self.metrics.observe_batcher(self.queue_depth, self.busy_slots, self.max_batch)

    def _drop_cancelled(self) -> None:
        now = time.perf_counter()
        expired = lambda j: j.cancelled.is_set() or (j.timeout is not None and now - j.arrival > j.timeout)
        for job in [j for j in self._waiting if expired(j)]:
            with self._cond:
                self._waiting.remove(job)
            self._end_cancelled(job)
        if self.prefilling is not None and expired(self.prefilling.job):
            job, self.prefilling = self.prefilling.job, None
            self._end_cancelled(job)
        for b, job in enumerate(self.active):
            if job is not None and expired(job):
                self._free(b)
                self._end_cancelled(job)

    def _end_cancelled(self, job: Job) -> None:
        if job.cancelled.is_set():
            self._finish(job, "cancelled")
        else:
            self._fail(job, f"the request timed out after {job.timeout} s", status=504)

    # ----- prefill -----
    def _begin_prefill(self, job: Job) -> None:
        job.times["prefill"] = time.perf_counter()
        length = -(-len(job.prompt_ids) // BUCKET) * BUCKET
        padded = np.zeros((length,), np.int32)
        padded[length - len(job.prompt_ids):] = job.prompt_ids
        self.prefilling = _Prefill(job, job.expert_threshold, padded, chunk_lengths(length, self.chunk_size))
        try:
            self.row_cache = steps.JITTED["reset"](self.row_cache, jnp.int32(length - len(job.prompt_ids)))
        except Exception as error:
            self.prefilling = None
            self.row_cache = init_cache(self.config, 1, self.max_context)
            self._fail(job, f"prefill failed: {error!r}")
            return
        self._prefill_step()

    def _prefill_step(self) -> None:
        p = self.prefilling
        try:
            self._run_chunk(p)
        except Exception as error:  # this request alone fails
            self.prefilling = None
            self.row_cache = init_cache(self.config, 1, self.max_context)
            self._fail(p.job, f"prefill failed: {error!r}")

    def _run_chunk(self, p: _Prefill) -> None:
        job = p.job
        size = p.chunks[p.chunk_index]
        ids = p.padded[p.position:p.position + size]
        following = np.append(p.padded[p.position + 1:p.position + size + 1], 0)[:size]  # the next token of each
        cache, logits, (counts, calls), extra = steps.JITTED["prefill"](
            self._model(p.threshold), bool(job.prompt_logprobs), self.params, self.row_cache,
            jnp.asarray(ids[None]), jnp.asarray(following[None].astype(np.int32)))
        self.row_cache = cache
        p.counts = counts if p.counts is None else p.counts + counts
        p.calls = calls if p.calls is None else p.calls + calls
        p.position += size
        p.chunk_index += 1
        if extra is not None:
            p.scores.append(jax.tree.map(np.asarray, extra))
        if p.position < len(p.padded):
            return
        # the whole prompt is in: prompt scores, then the first token
        if job.prompt_logprobs:
            logp = np.concatenate([s[0] for s in p.scores])
            ids_ = np.concatenate([s[1] for s in p.scores])
            lps = np.concatenate([s[2] for s in p.scores])
            pad = len(p.padded) - len(job.prompt_ids)
            job.prompt_scores = [None] + [(float(logp[pad + j - 1]), ids_[pad + j - 1].tolist(),
                                           lps[pad + j - 1].tolist()) for j in range(1, len(job.prompt_ids))]
        if job.max_new_tokens == 0:
            self.prefilling = None
            self._routing_from(job, p.counts, p.calls)
            job.times["first"] = time.perf_counter()
            self._finish(job, "length")
            return
        key = jax.random.key_data(jax.random.key(job.seed)).astype(jnp.uint32)
        p.sampling = self._sampling(job)
        token, (lp, top_ids, top_lps) = steps.JITTED["first"](logits, *p.sampling, key)
        p.first = (int(token), float(lp), np.asarray(top_ids).tolist(), np.asarray(top_lps).tolist(), key)
        job.times["first"] = time.perf_counter()
        if self._accept(job, *p.first[:4]):  # finished by its first token: no slot needed
            self.prefilling = None
            self._routing_from(job, p.counts, p.calls)
            self._finish(job, job.finish_reason)
            return
        self._try_insert()

    def _sampling(self, job: Job):
        """(temperature, top_k, top_p, bias (V,)) of a job as device scalars."""
        bias = np.zeros((self.config.vocab_size,), np.float32)
        for token, value in (job.logit_bias or {}).items():
            bias[token] = value
        return (jnp.float32(job.temperature), jnp.int32(job.top_k or self.config.vocab_size),
                jnp.float32(1.0 if job.top_p is None else job.top_p), jnp.asarray(bias))

    # ----- insert -----
    def _try_insert(self) -> None:
        p = self.prefilling
        job = p.job
        if None not in self.active or (self.busy_slots and p.threshold != self.batch_threshold):
            return
        live = [b for b, j in enumerate(self.active) if j is not None]
        lowest = min((self.start[b] for b in live), default=self.index)
        # the prompt must end at the index; its left padding may wrap to the end of the cache (never visible there)
        new_index = max(self.index - lowest, len(job.prompt_ids))
        delta = new_index - self.index
        ends = [self.start[b] + delta + len(self.active[b].prompt_ids) + self.active[b].max_new_tokens for b in live]
        ends.append(new_index + job.max_new_tokens)
        if max(ends) > self.max_context:
            return  # wait for rows to finish
        slot = self.active.index(None)
        try:
            if delta:
                self.slots = steps.JITTED["shift"](self.slots, jnp.int32(delta))
                self.index += delta
                self.start = [s + delta for s in self.start]
            token, _, _, _, key = p.first
            self.slots = steps.JITTED["insert"](self.slots, self.row_cache, jnp.int32(slot), jnp.int32(token), key,
                                                *p.sampling, p.counts, p.calls)
        except Exception as error:
            self.prefilling = None
            self._fail(job, f"insert failed: {error!r}")
            raise
        self.start[slot] = self.index - len(job.prompt_ids)
        self.active[slot] = job
        self.batch_threshold = p.threshold
        self.prefilling = None

    # ----- decode -----
    def _decode_step(self) -> None:
        self.slots, out = steps.JITTED["decode"](self._model(self.batch_threshold), self.params, self.slots)
        self.index += 1
        token, logp, top_ids, top_lps = jax.device_get(out)
        for b, job in enumerate(self.active):
            if job is None:
                continue
            if self._accept(job, int(token[b]), float(logp[b]), top_ids[b].tolist(), top_lps[b].tolist()):
                self._free(b)
                self._finish(job, job.finish_reason)

    def _free(self, b: int) -> None:
        job = self.active[b]
        self._routing_from(job, self.slots.counts[b], self.slots.calls[b])
        self.slots = steps.JITTED["release"](self.slots, jnp.int32(b))
        self.active[b] = None

    @staticmethod
    def _routing_from(job: Job, counts, calls) -> None:
        job.counts = np.rint(np.asarray(counts)).astype(np.int64)
        job.calls = np.rint(np.asarray(calls)).astype(np.int64)

    # ----- tokens to text -----
    def _accept(self, job: Job, token: int, logp: float, top_ids: list[int], top_lps: list[float]) -> bool:
        """Record a drawn token; emit the new text. Returns True when the job is finished (finish_reason set)."""
        job.token_ids.append(token)
        job.logprobs.append((logp, top_ids, top_lps))
        if token in job.stop_ids:
            job.finish_reason = "stop"
            return self._emit(job, final=True)
        text = self.decode_text(job.token_ids)
        for stop in job.stop_strings:
            at = text.find(stop, max(0, len(job.text) - len(stop)))
            if at >= 0:
                text = text[:at]
                job.text = text
                job.finish_reason = "stop"
                return self._emit(job, final=True)
        job.text = text
        if len(job.token_ids) >= job.max_new_tokens:
            job.finish_reason = "length"
            return self._emit(job, final=True)
        return self._emit(job, final=False)

    def _emit(self, job: Job, final: bool) -> bool:
        """Send the text that can no longer change: held back are an incomplete UTF-8 tail and any tail that could
        grow into a stop string."""
        safe = job.text
        if not final:
            if safe.endswith("\ufffd"):
                safe = safe.rstrip("\ufffd")
            for stop in job.stop_strings:
                for n in range(min(len(stop) - 1, len(safe)), 0, -1):
                    if safe.endswith(stop[:n]):
                        safe = safe[:-n]
                        break
        delta = safe[len(job.sent):] if safe.startswith(job.sent) else ""
        step = len(job.token_ids) - 1
        if job.on_event is not None:
            job.on_event("token", {"text": delta, "token_id": job.token_ids[-1], "logprob": job.logprobs[-1],
                                   "step": step})
        job.sent += delta
        if self.metrics is not None:
            self.metrics.observe_token(job)
        return final

    def _finish(self, job: Job, reason: str) -> None:
        job.finish_reason = reason
        job.times["end"] = time.perf_counter()
        unsent = job.text.startswith(job.sent) and job.sent != job.text
        if reason != "cancelled" and unsent and job.on_event is not None:
            job.on_event("token", {"text": job.text[len(job.sent):], "token_id": None, "logprob": None, "step": None})
            job.sent = job.text
        if job.on_event is not None:
            job.on_event("done", {})
        job.done.set()

    def _fail(self, job: Job, message: str, status: int = 500) -> None:
        job.error, job.error_status = message, status
        job.finish_reason = "error"
        job.times["end"] = time.perf_counter()
        if job.on_event is not None:
            job.on_event("done", {})
        job.done.set()

