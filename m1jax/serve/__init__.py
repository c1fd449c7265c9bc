"""m1jax.serve: `m1jax serve`, the HTTP server (seed endpoint, OpenAI-compatible routes) over continuous batching.

    steps.py          device steps: one-row prefill, insert into a slot, a decode step with per-row sampling/routing
    batcher.py        the scheduler thread: queue, chunked prefill between decode steps, slots, stops, cancellation
    app.py            FastAPI routes; validate.py request checks; routing_log.py per-request routing statistics
    chat_template.py  M1's chat template through jinja2; tool_calls.py  <tool_calls> blocks -> OpenAI tool_calls
    metrics.py        Prometheus metrics; cli.py  `m1jax serve` arguments and start-up
"""
