"""m1jax.serve: `m1jax serve`, the HTTP server (seed endpoint, OpenAI-compatible routes) over continuous batching.

    steps.py          device steps: prefill a group of requests, insert them into slots, K decode steps in one call
                      (per-row sampling, stops and routing on the device)
    batcher.py        the scheduler thread: queue, chunked group prefill between decode calls, slots, stop strings,
                      cancellation
    app.py            FastAPI routes; validate.py request checks; routing_log.py per-request routing statistics
    chat_template.py  M1's chat template through jinja2; tool_calls.py  <tool_calls> blocks -> OpenAI tool_calls
    metrics.py        Prometheus metrics; cli.py  `m1jax serve` arguments and start-up
"""
