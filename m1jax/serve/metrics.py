"""Prometheus metrics of the server (`GET /metrics`, text format), one registry per server.

    m1jax_requests_total{endpoint, status}      requests answered, by endpoint and HTTP status
    m1jax_prompt_tokens_total                  prompt tokens of finished requests
    m1jax_generation_tokens_total              drawn tokens
    m1jax_queue_depth                          requests waiting for a slot
    m1jax_slots_busy, m1jax_slot_occupancy     decode slots in use, and their fraction of all slots
    m1jax_time_to_first_token_seconds          arrival -> first drawn token (histogram)
    m1jax_inter_token_latency_seconds          between consecutive tokens of a request (histogram)
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("m1jax_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("m1jax_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("m1jax_generation_tokens", "tokens drawn", registry=r)
        self.queue_depth = Gauge("m1jax_queue_depth", "requests waiting for a decode slot", registry=r)
        self.slots_busy = Gauge("m1jax_slots_busy", "decode slots in use", registry=r)
        self.occupancy = Gauge("m1jax_slot_occupancy", "fraction of decode slots in use", registry=r)
        self.ttft = Histogram("m1jax_time_to_first_token_seconds", "arrival to first drawn token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("m1jax_inter_token_latency_seconds", "time between consecutive tokens of a request",
                             buckets=_LATENCY_BUCKETS, registry=r)

    def observe_batcher(self, queue_depth: int, busy: int, total: int) -> None:
        self.queue_depth.set(queue_depth)
        self.slots_busy.set(busy)
        self.occupancy.set(busy / total)

    def observe_tokens(self, job, count: int) -> None:
        """Called by the batcher for each run of `count` drawn tokens of a job that it hands over at once (a decode
        call's): the run's first token is timed from the job's arrival or its previous token, the others arrive
        with it (inter-token latency 0)."""
        if count <= 0:
            return
        now = time.perf_counter()
        last = job.times.get("last_token")
        if last is None:
            self.ttft.observe(now - job.arrival)
        else:
            self.itl.observe(now - last)
        for _ in range(count - 1):
            self.itl.observe(0.0)
        job.times["last_token"] = now
        self.generation_tokens.inc(count)

    def observe_request(self, endpoint: str, status: int, prompt_tokens: int = 0) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
