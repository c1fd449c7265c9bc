"""A live server on 127.0.0.1 (tests/serve/conftest.py): the official openai client, the seed endpoint, bad input,
concurrency, disconnects, per-request failures, metrics."""
import asyncio
import json
import time

import httpx
import numpy as np
import pytest

import m1jax
from m1jax.checkpoint.load import load_any
from m1jax.serve import steps

from .conftest import BROKEN_BLOCK, TOOL_BLOCK

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def client(live):
    import openai
    url, _ = live
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


def _post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=TIMEOUT, **kw)


def test_health_models_and_metrics(live):
    url, server = live
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    models = httpx.get(url + "/v1/models").json()
    assert models["data"][0]["id"] == "tiny-m1"
    _post(url, "/v1/minimax-m1/generate", {"input": "Hello", "max_output_tokens": 2})
    text = httpx.get(url + "/metrics").text
    for name in ("m1jax_requests_total", "m1jax_generation_tokens_total", "m1jax_queue_depth",
                 "m1jax_slot_occupancy", "m1jax_time_to_first_token_seconds_bucket",
                 "m1jax_inter_token_latency_seconds_bucket"):
        assert name in text
    assert 'endpoint="/v1/minimax-m1/generate",status="200"' in text


def test_seed_endpoint_schema_and_generate_equality(live, checkpoint):
    url, server = live
    out = _post(url, "/v1/minimax-m1/generate", {"input": "The weather in Paris", "max_output_tokens": 7,
                                                 "expert_threshold": None}).json()
    assert set(out) == {"id", "model", "text", "finish_reason", "usage", "routing", "timing"}
    assert out["finish_reason"] in ("stop", "length")
    ids = server.tokenizer.encode("The weather in Paris")
    config, params = load_any(checkpoint)
    reference = m1jax.generate(m1jax.M1ForCausalLM(config), params, [ids], max_new_tokens=7,
                               eos_id=server.tokenizer.eos_id)
    completion = reference.completions[0]
    assert out["usage"] == {"input_tokens": len(ids), "output_tokens": len(completion),
                            "total_tokens": len(ids) + len(completion)}
    assert out["text"] == server.text([t for t in completion if t != server.tokenizer.eos_id])
    layers = out["routing"]["layers"]
    assert len(layers) == config.num_layers
    np.testing.assert_array_equal([layer["tokens_per_expert"] for layer in layers], reference.routing.tokens_per_expert)
    for layer in layers:
        assert len(layer["load"]) == config.num_experts and abs(sum(layer["load"]) - 1) < 1e-5
        assert 0 <= layer["entropy"] <= np.log(config.num_experts) + 1e-6
        assert layer["experts_per_token"] == pytest.approx(config.experts_per_token)
    assert set(out["timing"]) == {"queue_ms", "prefill_ms", "decode_ms"}
    # streamed: text deltas, then one event with usage and routing
    with httpx.stream("POST", url + "/v1/minimax-m1/generate", timeout=TIMEOUT,
                      json={"input": "The weather in Paris", "max_output_tokens": 7, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert "".join(e.get("text", "") for e in events[:-1]) == out["text"] == events[-1]["text"]
    assert events[-1]["usage"] == out["usage"] and events[-1]["routing"] == out["routing"]


BAD_REQUESTS = [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({}, "input"),
    ({"input": ""}, "input"),
    ({"input": 5}, "input"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "max_output_tokens": "3"}, "max_output_tokens"),
    ({"input": "hi", "max_output_tokens": 1.5}, "max_output_tokens"),
    ({"input": "hi", "expert_threshold": 1.0}, "expert_threshold"),
    ({"input": "hi", "expert_threshold": -0.1}, "expert_threshold"),
    ({"input": "hi", "temperature": -1}, "temperature"),
    ({"input": "hi", "top_p": 0}, "top_p"),
    ({"input": "hi", "stop": [1]}, "stop"),
    ({"input": "hi", "stream": "yes"}, "stream"),
    ({"input": "hi", "max_output_tokens": 2000}, "max_output_tokens"),
    ({"input": "hi " * 40, "context_window": 10}, "input"),
    ({"input": "hi", "context_window": 5000}, "context_window"),
]


@pytest.mark.parametrize("body, field", BAD_REQUESTS)
def test_bad_input_is_a_4xx_naming_the_field(live, body, field):
    url, _ = live
    if isinstance(body, bytes):
        r = httpx.post(url + "/v1/minimax-m1/generate", content=body, timeout=TIMEOUT)
    else:
        r = _post(url, "/v1/minimax-m1/generate", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["message"]
    if field is not None:
        assert field in error["message"]
    if field in ("max_output_tokens", "context_window") and "context" in error["message"]:
        assert "1024" in error["message"]  # the limit is named


def test_openai_client_chat_completions_and_stream(live, client):
    url, server = live
    chat = client.chat.completions.create(model="tiny-m1", messages=[{"role": "system", "content": "Be brief."},
                                                                     {"role": "user", "content": "Hello"}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and chat.usage.completion_tokens <= 6
    assert len(choice.logprobs.content) == chat.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 for e in choice.logprobs.content)
    stream = client.chat.completions.create(model="tiny-m1", messages=[{"role": "system", "content": "Be brief."},
                                                                       {"role": "user", "content": "Hello"}],
                                            max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == (choice.message.content or "")
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    completion = client.completions.create(model="tiny-m1", prompt="Hello world", max_tokens=5, temperature=0,
                                           n=2, seed=3)
    assert len(completion.choices) == 2 and completion.choices[0].text == completion.choices[1].text
    streamed = client.completions.create(model="tiny-m1", prompt="Hello world", max_tokens=5, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == completion.choices[0].text


def test_streamed_logprobs_equal_the_whole_response(live, client):
    """A chunk carries a decode call's tokens: their log-probs, concatenated over the chunks, are the non-streamed
    response's (chat: content entries; completions: tokens, log-probs, alternatives and text offsets)."""
    messages = [{"role": "user", "content": "Count to ten"}]
    whole = client.chat.completions.create(model="tiny-m1", messages=messages, max_tokens=9, temperature=0,
                                           logprobs=True, top_logprobs=2)
    chunks = list(client.chat.completions.create(model="tiny-m1", messages=messages, max_tokens=9, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True))
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in entries] == [e.model_dump() for e in whole.choices[0].logprobs.content]
    assert len(entries) == whole.usage.completion_tokens > 0
    for echo in (False, True):
        body = dict(model="tiny-m1", prompt="Hello world", max_tokens=7, temperature=0, logprobs=2, echo=echo)
        want = client.completions.create(**body).choices[0]
        got = [c.choices[0] for c in client.completions.create(**body, stream=True) if c.choices]
        pieces = [c.logprobs for c in got if c.logprobs is not None]
        for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            joined = [x for p in pieces for x in getattr(p, field)]
            assert joined == getattr(want.logprobs, field)[-len(joined):], field
        assert len(pieces) and sum(len(p.tokens) for p in pieces) <= 7
        assert "".join(c.text for c in got) == want.text


def test_echo_logprobs_score_the_prompt(live, client, checkpoint):
    """lm-evaluation-harness's log-likelihood request: echo + logprobs with max_tokens 0 (and 1)."""
    url, server = live
    ids = server.tokenizer.encode("The weather in Paris is mild.")
    config, params = load_any(checkpoint)
    import jax
    import jax.numpy as jnp
    logits = m1jax.M1ForCausalLM(config).apply({"params": params}, jnp.asarray([ids])).logits[0]
    want = np.asarray(jax.nn.log_softmax(logits, -1))[np.arange(len(ids) - 1), ids[1:]]
    for max_tokens in (0, 1):
        out = client.completions.create(model="tiny-m1", prompt=ids, max_tokens=max_tokens, echo=True, logprobs=1,
                                        temperature=0)
        lp = out.choices[0].logprobs
        assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids) + max_tokens
        np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], want, rtol=1e-4, atol=1e-4)
        assert out.choices[0].text.startswith(server.text(ids))
        assert all(len(t) == 1 for t in lp.top_logprobs[1:])


def test_tool_call_round_trip(live, client):
    """logit_bias makes the model write TOOL_BLOCK (one token of the test tokenizer): parsed into tool_calls, also
    streamed; the tool result goes back through the template; a block that does not parse stays in content."""
    url, server = live
    tool_id = server.tokenizer.tokenizer.token_to_id(TOOL_BLOCK)
    broken_id = server.tokenizer.tokenizer.token_to_id(BROKEN_BLOCK)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    chat = client.chat.completions.create(model="tiny-m1", messages=messages, tools=tools, max_tokens=1,
                                          logit_bias={str(tool_id): 100})
    choice = chat.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    stream = client.chat.completions.create(model="tiny-m1", messages=messages, tools=tools, max_tokens=1,
                                            logit_bias={str(tool_id): 100}, stream=True)
    chunks = list(stream)
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas] == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    follow = messages + [choice.message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    answer = client.chat.completions.create(model="tiny-m1", messages=follow, tools=tools, max_tokens=3)
    assert answer.choices[0].finish_reason in ("stop", "length")
    broken = client.chat.completions.create(model="tiny-m1", messages=messages, tools=tools, max_tokens=1,
                                            logit_bias={str(broken_id): 100})
    assert broken.choices[0].message.content == BROKEN_BLOCK and not broken.choices[0].message.tool_calls


def test_concurrent_clients_equal_alone(live):
    """32 concurrent greedy clients (8 slots): each gets what it gets alone."""
    url, _ = live
    prompts = [f"Hello {i} " * (1 + i % 7) for i in range(32)]

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as http:
            replies = await asyncio.gather(*[http.post("/v1/completions", json={
                "prompt": p, "max_tokens": 4 + i % 5, "temperature": 0}) for i, p in enumerate(prompts)])
            return [r.json() for r in replies]

    together = asyncio.run(asyncio.wait_for(go(), TIMEOUT))
    for i in (0, 13, 31):
        alone = _post(url, "/v1/completions", {"prompt": prompts[i], "max_tokens": 4 + i % 5, "temperature": 0})
        assert alone.json()["choices"][0]["text"] == together[i]["choices"][0]["text"]


def test_disconnect_mid_stream_frees_the_slot(live, monkeypatch):
    """The job of a client that leaves is cancelled (not run to its 1000 tokens) and its slot freed."""
    url, server = live
    jobs = []
    submit = server.batcher.submit
    monkeypatch.setattr(server.batcher, "submit", lambda job: jobs.append(job) or submit(job))
    with httpx.stream("POST", url + "/v1/completions", timeout=TIMEOUT,
                      json={"prompt": "Hello", "max_tokens": 1000, "stream": True, "temperature": 0}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first event
    assert jobs[0].done.wait(30)
    assert jobs[0].finish_reason == "cancelled" and len(jobs[0].token_ids) < 1000
    for _ in range(200):  # at most 10 s
        if server.batcher.busy_slots == 0 and server.batcher.queue_depth == 0:
            break
        time.sleep(0.05)
    assert server.batcher.busy_slots == 0
    assert _post(url, "/v1/completions", {"prompt": "Hello", "max_tokens": 2}).status_code == 200


def test_one_failing_request_fails_alone(live, monkeypatch):
    """An exception inside one request's prefill is a 500 with its message; the others are served."""
    url, server = live
    marker = server.tokenizer.encode("Paris")[0]
    original = steps.JITTED["prefill"]

    def failing(model, with_logprobs, params, cache, tokens):
        if bool((np.asarray(tokens)[:, :-1] == marker).any()):
            raise RuntimeError("injected failure")
        return original(model, with_logprobs, params, cache, tokens)

    monkeypatch.setitem(steps.JITTED, "prefill", failing)
    bad = _post(url, "/v1/completions", {"prompt": [marker, marker], "max_tokens": 2})
    assert bad.status_code == 500 and "injected failure" in bad.json()["error"]["message"]
    good = _post(url, "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    assert good.status_code == 200


def test_full_queue_is_429_with_retry_after(live, monkeypatch):
    url, server = live
    monkeypatch.setattr(server.batcher, "max_queue", 0)
    r = _post(url, "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"
