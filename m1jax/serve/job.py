"""A generation request (`Job`), its rows' sampling settings (`draw_settings`, `sampling_mode`), and
the way its drawn tokens become text and events (`TokenOutput`).

Text is decoded incrementally (a window of a few tokens per run of new tokens, as vLLM does per token); the whole
completion is decoded once, when the request ends. A run (a decode call's tokens of one request) is detokenized
once and sent in one event. Stop ids end a request at the token; stop strings end it with the text cut before the
string; text that could still grow into a stop string is held back from streaming.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable

import numpy as np

from m1jax.inference.sampling import row_sampling
from m1jax.serve.steps import TOP_LOGPROBS


def draw_settings(jobs: list, vocab: int) -> tuple[list[float], list[int], list[float]]:
    """(temperature, top_k, top_p) of each job, the filters' "off" values filled in (top_k V, top_p 1)."""
    return ([job.temperature for job in jobs], [job.top_k or vocab for job in jobs],
            [1.0 if job.top_p is None else job.top_p for job in jobs])


def sampling_mode(jobs: list, vocab: int) -> str:
    """The decode step's sampling mode (m1jax.inference.sampling.row_sampling) for these jobs (None: a free slot)."""
    return row_sampling(*draw_settings([job for job in jobs if job is not None], vocab), vocab)


def stop_string_at(text: str, before: int, stops) -> int | None:
    """Where the first stop string that `text` past position `before` completes begins (None: none does)."""
    hits = [at for at in (text.find(stop, max(0, before - len(stop))) for stop in stops) if at >= 0]
    return min(hits) if hits else None


class QueueFull(Exception):
    """The waiting queue is at its bound: retry later (HTTP 429)."""


@dataclasses.dataclass
class Job:
    """One generation request. prompt_ids: token ids; max_new_tokens >= 1 (0 only with prompt_logprobs, to score a
    prompt); stop_ids end it (the id is kept in token_ids, not in text); stop_strings end it with the text cut before
    the string (tokens drawn after it are discarded). expert_threshold None keeps the model's. prompt_logprobs:
    compute log p(prompt[j] | prompt[:j]). want_logprobs: record each drawn token's log-prob and the
    `top_logprobs` (0-20) most likely tokens' (job.logprobs; None per token otherwise). want_routing: count the
    request's own expert choices (job.counts, job.calls, for its routing log); a decode batch in which no request
    wants them skips that work."""
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
    want_logprobs: bool = False
    top_logprobs: int = TOP_LOGPROBS  # alternatives wanted with want_logprobs; 0 in every row skips the top-k
    want_routing: bool = True
    logit_bias: dict[int, float] | None = None
    timeout: float | None = None
    on_event: Callable[[str, dict], Any] | None = None
    # filled in by the batcher
    id: int = 0
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[tuple[float, list[int], list[float]] | None] = dataclasses.field(default_factory=list)
    prompt_scores: list[tuple[float, list[int], list[float]] | None] = dataclasses.field(default_factory=list)
    text: str = ""
    sent: str = ""
    finish_reason: str | None = None
    error: str | None = None
    error_status: int = 500
    counts: np.ndarray | None = None
    calls: np.ndarray | None = None
    times: dict[str, float] = dataclasses.field(default_factory=dict)
    # incremental decoding: token_ids[prefix:read] were decoded last time, token_ids[read:] are new
    prefix_offset: int = 0
    read_offset: int = 0
    solo: bool = False  # prefill alone (after its group's prefill failed)
    prompt_array: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)  # int32, checked

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def timing_ms(self) -> dict[str, float]:
        t = self.times
        ms = lambda a, b: round(1000 * (t.get(b, t.get(a, 0.0)) - t.get(a, 0.0)), 3) if a in t else 0.0
        return {"queue_ms": round(1000 * (t.get("prefill", self.arrival) - self.arrival), 3),
                "prefill_ms": ms("prefill", "first"), "decode_ms": ms("first", "end")}


class TokenOutput:
    """Tokens to text and events for a job: the half of the batcher that needs no device. Needs `self.decode_text`
    (token ids -> str) and `self.metrics` (a serve.metrics object or None)."""

    def _accept(self, job: Job, token: int, logprob: tuple | None) -> bool:
        """Record a drawn token; emit the new text. Returns True when the job is finished (finish_reason set)."""
        return self._accept_tokens(job, [token], [logprob]) is not None

    def _accept_tokens(self, job: Job, tokens: list[int], logprobs: list | None = None) -> int | None:
        """Record drawn tokens in order (logprobs: one per token; None: None for each), up to the one that finishes
        the job (a stop id, a stop string, the length; finish_reason set): returns its index, or None when the job
        goes on. The run's new text is decoded once and goes out in one "tokens" event: a decode call's K tokens
        cost one detokenization and one event, not K. A run in whose new text a stop string completes is taken
        again one token at a time (`_accept_each`, the slow twin), to end at the token that completes it; so is a
        request's run with stop strings whose text ends in an incomplete character (held back whole, its text
        could hide a stop string that a token before the tail completes)."""
        ids = job.token_ids
        first = len(ids)
        n = min(len(tokens), job.max_new_tokens - first)
        if n <= 0:
            return None
        stop_at = next((i for i, t in enumerate(tokens[:n]) if t in job.stop_ids), None) if job.stop_ids else None
        if stop_at is not None:
            n = stop_at + 1
        saved = job.text, job.prefix_offset, job.read_offset
        ids.extend(tokens[:n])
        job.logprobs.extend([None] * n if logprobs is None else logprobs[:n])
        before = len(job.text)
        if stop_at is None:
            job.text += self._new_text(job)
        else:  # the final text: the completion without its stop id, decoded whole
            job.text = self.decode_text(ids[:-1])
        held = lambda: (stop_at is None and job.read_offset < len(ids)  # text held back: an incomplete character
                        and self.decode_text(ids[job.prefix_offset:]).endswith("\ufffd"))
        if job.stop_strings and (stop_string_at(job.text, before, job.stop_strings) is not None or held()):
            del ids[first:], job.logprobs[first:]
            job.text, job.prefix_offset, job.read_offset = saved
            return self._accept_each(job, tokens[:n], logprobs)
        if stop_at is not None:
            job.finish_reason = "stop"
            self._emit(job, first, final=True)
            return stop_at
        if len(ids) >= job.max_new_tokens:
            job.finish_reason = "length"
            self._end_text(job, ids, first)
            return n - 1
        self._emit(job, first, final=False)
        return None

    def _accept_each(self, job: Job, tokens: list[int], logprobs: list | None = None) -> int | None:
        """`_accept_tokens` one token at a time (an event and two detokenizations per token): the slow twin, and
        the path of a run in which a stop string completes or may hide."""
        ids, scores, stop_ids = job.token_ids, job.logprobs, job.stop_ids
        for n, token in enumerate(tokens):
            ids.append(token)
            scores.append(None if logprobs is None else logprobs[n])
            first = len(ids) - 1
            if token in stop_ids:
                job.finish_reason = "stop"
                self._end_text(job, ids[:-1], first)
                return n
            before = len(job.text)
            job.text += self._new_text(job)
            if self._cut_at_stop(job, before):
                self._emit(job, first, final=True)
                return n
            if len(ids) >= job.max_new_tokens:
                job.finish_reason = "length"
                self._end_text(job, ids, first)
                return n
            self._emit(job, first, final=False)
        return None

    def _new_text(self, job: Job) -> str:
        """The text the new tokens add (vLLM's incremental detokenization): decode the unread tokens together with
        the few before them, so that what they add comes out as in the decoding of the whole (spaces, characters
        spanning tokens); nothing while it ends in an incomplete UTF-8 character (U+FFFD)."""
        ids = job.token_ids
        before = self.decode_text(ids[job.prefix_offset:job.read_offset])
        now = self.decode_text(ids[job.prefix_offset:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        job.prefix_offset, job.read_offset = job.read_offset, len(ids)
        return now[len(before):]

    def _cut_at_stop(self, job: Job, before: int) -> bool:
        """End the job at the first stop string that the text past `before` completes (the text cut before it)."""
        at = stop_string_at(job.text, before, job.stop_strings)
        if at is None:
            return False
        job.text = job.text[:at]
        job.finish_reason = "stop"
        return True

    def _end_text(self, job: Job, ids: list[int], first: int) -> bool:
        """The final text: the whole completion decoded once (with any incomplete tail), stop strings applied; sent
        with the tokens from index `first` on."""
        before = len(job.text)
        job.text = self.decode_text(ids)
        if self._cut_at_stop(job, before):
            job.finish_reason = "stop"
        return self._emit(job, first, final=True)

    def _emit(self, job: Job, first: int, final: bool) -> bool:
        """Send the tokens from index `first` on and the text that can no longer change, in one "tokens" event
        {"text", "token_ids", "logprobs", "step" (the index of the first of them)}: held back is any tail that could
        grow into a stop string."""
        safe = job.text
        if not final:
            for stop in job.stop_strings:
                for n in range(min(len(stop) - 1, len(safe)), 0, -1):
                    if safe.endswith(stop[:n]):
                        safe = safe[:-n]
                        break
        delta = safe[len(job.sent):] if safe.startswith(job.sent) else ""
        if job.on_event is not None:
            job.on_event("tokens", {"text": delta, "token_ids": job.token_ids[first:],
                                    "logprobs": job.logprobs[first:], "step": first})
        job.sent += delta
        if self.metrics is not None:
            self.metrics.observe_tokens(job, len(job.token_ids) - first)
        return final

    def _finish(self, job: Job, reason: str) -> None:
        job.finish_reason = reason
        job.times["end"] = time.perf_counter()
        unsent = job.text.startswith(job.sent) and job.sent != job.text
        if reason != "cancelled" and unsent and job.on_event is not None:
            job.on_event("tokens", {"text": job.text[len(job.sent):], "token_ids": [], "logprobs": [], "step": None})
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
