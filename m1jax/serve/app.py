"""The HTTP routes (FastAPI): the seed's generate endpoint, OpenAI-compatible completions and chat, health, metrics.

    GET  /health                     200 {"status": "ok"} once the model is loaded and its steps compiled, else 503
    GET  /metrics                    Prometheus text format (m1jax.serve.metrics)
    GET  /v1/models                  the one served model
    POST /v1/minimax-m1/generate     {"input", "max_output_tokens", "context_window", "expert_threshold", ...}
    POST /v1/completions             OpenAI completions (+ echo with prompt log-probabilities, top_k, expert_threshold)
    POST /v1/chat/completions        OpenAI chat (M1's chat template, tools -> tool_calls)

Every request becomes one or more batcher Jobs (n choices, several prompts); their events cross from the scheduler
thread to the event loop through call_soon_threadsafe. Errors are JSON {"error": {"message", "type", "param",
"code"}}: 400 for a bad field (named in param), 429 with Retry-After when the queue is full, 504 on the request
timeout, 500 with the message when something fails inside one request; the server itself keeps running.
A client that disconnects cancels its jobs (their slots are freed at the next step).
"""
from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from m1jax.serve import routing_log
from m1jax.serve.batcher import Batcher, Job, QueueFull
from m1jax.serve.chat_template import render_chat, to_template_messages
from m1jax.serve.metrics import CONTENT_TYPE, Metrics
from m1jax.serve.tool_calls import ToolCallStream, parse_tool_calls
from m1jax.serve.validate import ApiError, bad, boolean, integer, object_body, sampling, stop_strings
from m1jax.tokenizer import decode_known

END_OF_TURN = "<end_of_sentence>"  # the chat template closes every turn with it


class Server:
    """What the routes share: the batcher, the tokenizer, the chat template, limits and metrics."""

    def __init__(self, batcher: Batcher, tokenizer, *, model_name: str, template: str | None = None,
                 request_timeout: float | None = 600.0, metrics: Metrics | None = None):
        self.batcher, self.tokenizer, self.model_name, self.template = batcher, tokenizer, model_name, template
        self.request_timeout = request_timeout
        self.metrics = metrics or batcher.metrics or Metrics()
        self.ready = False
        self.created = int(time.time())

    def text(self, ids: list[int]) -> str:
        return decode_known(self.tokenizer, ids)

    def token_text(self, token: int) -> str:
        return self.text([token])

    @property
    def stop_ids(self) -> tuple[int, ...]:
        eos = self.tokenizer.eos_id
        return () if eos is None else (eos,)


# ----- jobs <-> asyncio -----
class _Run:
    """Jobs of one HTTP request, with an asyncio queue of (job index, kind, data) events."""

    def __init__(self, server: Server, jobs: list[Job]):
        self.server, self.jobs = server, jobs
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        for i, job in enumerate(jobs):
            job.on_event = self._sink(i)
            job.timeout = server.request_timeout

    def _sink(self, i: int):
        def put(kind, data):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, kind, data))
        return put

    def submit(self) -> None:
        try:
            for job in self.jobs:
                self.server.batcher.submit(job)
        except QueueFull as error:
            self.cancel()
            raise ApiError(429, f"the server is busy: {error}; retry after a second", None, "rate_limit_error")
        except ValueError as error:
            self.cancel()
            raise ApiError(400, str(error), "prompt")

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    async def events(self) -> AsyncIterator[tuple[int, str, dict]]:
        remaining = len(self.jobs)
        while remaining:
            i, kind, data = await self.queue.get()
            if kind == "done":
                remaining -= 1
            yield i, kind, data

    async def wait(self, request: Request) -> None:
        """Until every job is done; cancels them if the client goes away."""
        pending = {i for i in range(len(self.jobs))}
        while pending:
            try:
                i, kind, _ = await asyncio.wait_for(self.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.cancel()
                continue
            if kind == "done":
                pending.discard(i)

    def raise_failures(self) -> None:
        for job in self.jobs:
            if job.error is not None:
                raise ApiError(job.error_status, job.error, None, "server_error")


def _seed(value: int | None) -> int:
    return int.from_bytes(os.urandom(4), "little") % 2**31 if value is None else value % 2**31


def _usage(jobs: list[Job], prompts: list[list[int]]) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(len(j.token_ids) for j in jobs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _sse(data: Any) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


# ----- the app -----
def build_app(server: Server) -> FastAPI:
    app = FastAPI(title="m1jax serve")
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        server.metrics.observe_request(request.url.path, error.status)
        headers = {"Retry-After": "1"} if error.status == 429 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, error: Exception):
        server.metrics.observe_request(request.url.path, 500)
        return JSONResponse(ApiError(500, f"internal error: {error!r}", None, "server_error").body(), status_code=500)

    @app.get("/health")
    async def health():
        if not server.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "m1jax", "max_model_len": server.batcher.max_context}]}

    @app.post("/v1/minimax-m1/generate")
    async def seed_generate(request: Request):
        return await _seed_generate(server, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _completions(server, request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _chat(server, request)

    return app


def _check_ready(server: Server) -> None:
    if not server.ready:
        raise ApiError(503, "the model is still loading; poll GET /health", None, "server_error")


# ----- the seed endpoint -----
async def _seed_generate(server: Server, request: Request):
    _check_ready(server)
    path = "/v1/minimax-m1/generate"
    body = object_body(await request.body())
    text = body.get("input")
    if not isinstance(text, str) or not text:
        raise bad("input", "input is required: a non-empty string")
    explicit = body.get("max_output_tokens") is not None
    max_out = integer(body, "max_output_tokens", 256, 1)
    window = integer(body, "context_window", None, 1)
    params = sampling(body, 0.0)
    stream = boolean(body, "stream", False)
    stops = stop_strings(body)
    ids = server.tokenizer.encode(text)
    if not ids:
        raise bad("input", "input is empty after tokenization")
    limit = server.batcher.max_context
    if window is not None:
        if window > limit:
            raise bad("context_window", f"context_window ({window}) exceeds the server's context of {limit} tokens")
        if len(ids) >= window:
            raise bad("input", f"the input ({len(ids)} tokens) does not fit context_window ({window} tokens) with "
                               "room for one output token; shorten it or raise context_window")
        max_out = min(max_out, window - len(ids))
    if not explicit:  # the default asks for no more than fits
        max_out = max(1, min(max_out, limit - len(ids)))
    if len(ids) + max_out > limit:
        field = "max_output_tokens" if explicit else "input"
        raise bad(field, f"the input ({len(ids)} tokens) + max_output_tokens ({max_out}) exceeds the server's "
                         f"context of {limit} tokens")
    job = Job(ids, max_out, temperature=params["temperature"], top_k=params["top_k"], top_p=params["top_p"],
              seed=_seed(params["seed"]), stop_ids=server.stop_ids, stop_strings=stops,
              expert_threshold=params["expert_threshold"], logit_bias=params["logit_bias"])
    run = _Run(server, [job])
    run.submit()
    rid = f"gen-{uuid.uuid4().hex}"

    def result() -> dict:
        usage = _usage([job], [ids])
        server.metrics.observe_request(path, 200, len(ids))
        threshold = (server.batcher.model.policy.expert_threshold if params["expert_threshold"] is None
                     else params["expert_threshold"])
        return {"id": rid, "model": server.model_name, "text": job.text,
                "finish_reason": "stop" if job.finish_reason == "stop" else "length",
                "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                          "total_tokens": usage["total_tokens"]},
                "routing": routing_log.routing(job, server.batcher.model.config, threshold),
                "timing": job.timing_ms}

    if not stream:
        await run.wait(request)
        run.raise_failures()
        return result()

    async def events():
        try:
            async for _, kind, data in run.events():
                if kind == "tokens" and data["text"]:
                    yield _sse({"text": data["text"]})
            if job.error is not None:
                yield _sse(ApiError(job.error_status, job.error, None, "server_error").body())
            else:
                yield _sse({**result(), "done": True})
        finally:
            run.cancel()
    return StreamingResponse(events(), media_type="text/event-stream")


# ----- OpenAI completions -----
def _prompts(server: Server, prompt: Any) -> list[list[int]]:
    """str | [str] | [int] | [[int]] -> token id lists."""
    vocab = server.batcher.config.vocab_size
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad("prompt", "prompt must be a string, a list of strings, a list of token ids or a list of those")
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            ids = server.tokenizer.encode(p)
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            ids = list(p)
            if any(not 0 <= t < vocab for t in ids):
                raise bad("prompt", f"prompt[{i}] has token ids outside [0, {vocab})")
        else:
            raise bad("prompt", f"prompt[{i}] must be a string or a list of token ids")
        if not ids:
            raise bad("prompt", f"prompt[{i}] is empty (after tokenization); give at least one token")
        out.append(ids)
    return out


def _check_fit(server: Server, ids: list[int], max_tokens: int, field: str, what: str) -> None:
    limit = server.batcher.max_context
    if len(ids) + max_tokens > limit:
        raise bad(field, f"the {what} ({len(ids)} tokens) + {field} ({max_tokens}) exceeds the server's context of "
                         f"{limit} tokens; shorten the {what} or lower {field}")


def _completion_logprobs(server: Server, token_ids: list[int], scores: list, n: int, offset: int = 0) -> dict:
    """OpenAI completions `logprobs` of tokens (scores: (log-prob, top ids, top log-probs) or None each), n
    alternatives; text_offset counts from `offset` (the characters before the first of them)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for token, score in zip(token_ids, scores):
        piece = server.token_text(token)
        tokens.append(piece)
        offsets.append(offset)
        offset += len(piece)
        if score is None:
            token_lps.append(None)
            tops.append(None)
        else:
            token_lps.append(score[0])
            tops.append({server.token_text(t): lp for t, lp in zip(score[1][:n], score[2][:n])} if n else {})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


async def _completions(server: Server, request: Request):
    _check_ready(server)
    path = "/v1/completions"
    body = object_body(await request.body())
    if "prompt" not in body:
        raise bad("prompt", "prompt is required")
    prompts = _prompts(server, body["prompt"])
    echo = boolean(body, "echo", False)
    logprobs = integer(body, "logprobs", None, 0, 20)
    max_tokens = integer(body, "max_tokens", 16, 0 if echo else 1)
    n = integer(body, "n", 1, 1, 16)
    params = sampling(body, 1.0)
    stream = boolean(body, "stream", False)
    include_usage = stream and isinstance(body.get("stream_options"), dict) and bool(
        body["stream_options"].get("include_usage"))
    stops = stop_strings(body)
    if max_tokens == 0 and stream:
        raise bad("max_tokens", "max_tokens 0 (scoring the prompt) is not streamed; set stream to false")
    for ids in prompts:
        _check_fit(server, ids, max_tokens, "max_tokens", "prompt")
    seed = params["seed"]
    jobs = [Job(ids, max_tokens, temperature=params["temperature"], top_k=params["top_k"], top_p=params["top_p"],
                seed=_seed(None if seed is None else seed + j), stop_ids=server.stop_ids, stop_strings=stops,
                expert_threshold=params["expert_threshold"], logit_bias=params["logit_bias"],
                prompt_logprobs=echo and logprobs is not None, want_logprobs=logprobs is not None,
                top_logprobs=logprobs or 0, want_routing=False)  # OpenAI responses carry no routing log
            for ids in prompts for j in range(n)]
    run = _Run(server, jobs)
    run.submit()
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": server.model_name}
    prompt_texts = [server.text(ids) for ids in prompts]

    def choice(k: int, job: Job) -> dict:
        prompt = prompts[k // n]
        prefix = prompt_texts[k // n] if echo else ""
        scored = (prompt, job.prompt_scores or [None] * len(prompt)) if echo else ([], [])
        lp = None if logprobs is None else _completion_logprobs(server, scored[0] + job.token_ids,
                                                                scored[1] + job.logprobs, logprobs)
        return {"index": k, "text": prefix + job.text, "logprobs": lp,
                "finish_reason": "stop" if job.finish_reason == "stop" else "length"}

    if not stream:
        await run.wait(request)
        run.raise_failures()
        server.metrics.observe_request(path, 200, sum(map(len, prompts)))
        return {**head, "choices": [choice(k, job) for k, job in enumerate(jobs)],
                "usage": _usage(jobs, [prompts[k // n] for k in range(len(jobs))])}

    async def events():
        try:
            if echo:
                for k in range(len(jobs)):
                    yield _sse({**head, "choices": [{"index": k, "text": prompt_texts[k // n], "logprobs": None,
                                                     "finish_reason": None}]})
            # text_offset so far, counted as the whole response counts it (token texts, the echoed prompt's first)
            offsets = [sum(len(server.token_text(t)) for t in prompts[k // n]) if echo and logprobs is not None
                       else 0 for k in range(len(jobs))]
            async for k, kind, data in run.events():
                job = jobs[k]
                if kind == "tokens" and (data["text"] or data["token_ids"]):
                    lp = None
                    if logprobs is not None and data["token_ids"]:
                        lp = _completion_logprobs(server, data["token_ids"], data["logprobs"], logprobs, offsets[k])
                        offsets[k] += sum(map(len, lp["tokens"]))
                    yield _sse({**head, "choices": [{"index": k, "text": data["text"], "logprobs": lp,
                                                     "finish_reason": None}]})
                elif kind == "done":
                    if job.error is not None:
                        yield _sse(ApiError(job.error_status, job.error, None, "server_error").body())
                        continue
                    yield _sse({**head, "choices": [{"index": k, "text": "", "logprobs": None, "finish_reason":
                                                     "stop" if job.finish_reason == "stop" else "length"}]})
            if include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(jobs, [prompts[k // n] for k in range(len(jobs))])})
            server.metrics.observe_request(path, 200, sum(map(len, prompts)))
            yield _sse("[DONE]")
        finally:
            run.cancel()
    return StreamingResponse(events(), media_type="text/event-stream")


# ----- OpenAI chat -----
def _chat_logprobs(server: Server, token_ids: list[int], scores: list, n: int) -> dict:
    """OpenAI chat `logprobs` of drawn tokens (scores: (log-prob, top ids, top log-probs) each), n alternatives."""
    def entry(token, lp):
        text = server.token_text(token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**entry(t, s[0]), "top_logprobs": [entry(i, v) for i, v in zip(s[1][:n], s[2][:n])]}
                        for t, s in zip(token_ids, scores)]}


def chat_prompt(server: Server, body: dict) -> tuple[list[int], bool]:
    """Render and tokenize the chat prompt. Returns (ids, whether tools were offered)."""
    try:
        messages = to_template_messages(body.get("messages"))
    except ValueError as error:
        raise bad("messages", str(error)) from None
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise bad("tools", "tools must be a list of {type: function, function: {name, description, parameters}}")
    choice = body.get("tool_choice", "auto")
    if choice not in ("auto", "none", "required") and not isinstance(choice, dict):
        raise bad("tool_choice", "tool_choice must be auto, none, required or {type: function, function: {name}}")
    offered = bool(tools) and choice != "none"
    try:
        text = render_chat(messages, tools=tools if offered else None, add_generation_prompt=True,
                           template=server.template, tool_choice=choice)
    except Exception as error:  # a template that raises on these messages
        raise bad("messages", f"the chat template cannot render these messages: {error}") from None
    return server.tokenizer.encode(text), offered


async def _chat(server: Server, request: Request):
    _check_ready(server)
    path = "/v1/chat/completions"
    body = object_body(await request.body())
    ids, offered = chat_prompt(server, body)
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    limit = server.batcher.max_context
    max_tokens = integer(body, field, None, 1)
    if max_tokens is None:
        max_tokens = max(1, min(1024, limit - len(ids)))
    want_logprobs = boolean(body, "logprobs", False)
    top = integer(body, "top_logprobs", 0, 0, 20)
    n = integer(body, "n", 1, 1, 16)
    params = sampling(body, 1.0)
    stream = boolean(body, "stream", False)
    include_usage = stream and isinstance(body.get("stream_options"), dict) and bool(
        body["stream_options"].get("include_usage"))
    stops = stop_strings(body) + (END_OF_TURN,)
    _check_fit(server, ids, max_tokens, field, "rendered chat prompt")
    seed = params["seed"]
    jobs = [Job(ids, max_tokens, temperature=params["temperature"], top_k=params["top_k"], top_p=params["top_p"],
                seed=_seed(None if seed is None else seed + j), stop_ids=server.stop_ids, stop_strings=stops,
                expert_threshold=params["expert_threshold"], logit_bias=params["logit_bias"],
                want_logprobs=want_logprobs, top_logprobs=top, want_routing=False) for j in range(n)]
    run = _Run(server, jobs)
    run.submit()
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "chat.completion", "created": created, "model": server.model_name}

    if not stream:
        await run.wait(request)
        run.raise_failures()
        choices = []
        for k, job in enumerate(jobs):
            content, calls = parse_tool_calls(job.text) if offered else (job.text, [])
            message = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            reason = "tool_calls" if calls else ("stop" if job.finish_reason == "stop" else "length")
            choices.append({"index": k, "message": message, "finish_reason": reason,
                            "logprobs": _chat_logprobs(server, job.token_ids, job.logprobs, top) if want_logprobs
                            else None})
        server.metrics.observe_request(path, 200, len(ids))
        return {**head, "choices": choices, "usage": _usage(jobs, [ids] * n)}

    chunk_head = {**head, "object": "chat.completion.chunk"}

    def chunk(k: int, delta: dict, reason: str | None = None, logprobs: Any = None) -> bytes:
        return _sse({**chunk_head, "choices": [{"index": k, "delta": delta, "logprobs": logprobs,
                                                "finish_reason": reason}]})

    async def events():
        splitters = [ToolCallStream() if offered else None for _ in jobs]
        called = [False] * len(jobs)

        def pieces(k: int, text: str, final: bool):
            if splitters[k] is None:
                return [("content", text)] if text else []
            return splitters[k].feed(text) + (splitters[k].close() if final else [])

        def render(k: int, items) -> list[bytes]:
            out = []
            for kind, value in items:
                if kind == "content" and value:
                    out.append(chunk(k, {"content": value}))
                elif kind == "tool_call":
                    called[k] = True
                    out.append(chunk(k, {"tool_calls": [value]}))
            return out

        try:
            for k in range(len(jobs)):
                yield chunk(k, {"role": "assistant", "content": ""})
            async for k, kind, data in run.events():
                job = jobs[k]
                if kind == "tokens":
                    if want_logprobs and data["token_ids"]:
                        yield chunk(k, {}, None, _chat_logprobs(server, data["token_ids"], data["logprobs"], top))
                    for piece in render(k, pieces(k, data["text"], False)):
                        yield piece
                elif kind == "done":
                    if job.error is not None:
                        yield _sse(ApiError(job.error_status, job.error, None, "server_error").body())
                        continue
                    for piece in render(k, pieces(k, "", True)):
                        yield piece
                    reason = "tool_calls" if called[k] else ("stop" if job.finish_reason == "stop" else "length")
                    yield chunk(k, {}, reason)
            if include_usage:
                yield _sse({**chunk_head, "choices": [], "usage": _usage(jobs, [ids] * n)})
            server.metrics.observe_request(path, 200, len(ids))
            yield _sse("[DONE]")
        finally:
            run.cancel()
    return StreamingResponse(events(), media_type="text/event-stream")


__all__ = ["Server", "build_app", "chat_prompt"]
