"""`m1jax serve`: a checkpoint behind HTTP (the seed's generate API and OpenAI-compatible routes).

    m1jax serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--max-batch 64] [--max-context 4096]
                [--dtype bfloat16] [--mesh tensor=4] [--chunk-size 512] [--max-queue 256]
                [--decode-steps 8] [--prefill-batch 8] [--request-timeout 600] [--tokenizer PATH]
                [--model-name NAME]

DIR is anything `m1jax generate` accepts. Start-up loads the weights, compiles the steps (a warm-up request through
the batcher), then logs "ready" and answers GET /health with 200. SIGTERM (or Ctrl-C) stops accepting connections,
lets the requests in flight finish (uvicorn's graceful shutdown), then stops the batcher and exits.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import time

log = logging.getLogger("m1jax.serve")


def add_serve_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from m1jax.cli_args import count, mesh_spec, real
    from m1jax.serve.batcher import DECODE_STEPS, PREFILL_BATCH
    p.add_argument("--checkpoint", required=True, help="a training output or a Hugging Face directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=count(0, 65535), default=8000, help="port (0: any free port, printed when ready)")
    p.add_argument("--max-batch", type=count(1), default=64, help="decode slots (requests decoded together)")
    p.add_argument("--max-context", type=count(16), default=None,
                   help="cache slots per request, prompt + output (default: min(4096, the model's limit))")
    p.add_argument("--dtype", default=None, help="parameter dtype, e.g. bfloat16 (default: the checkpoint's)")
    p.add_argument("--mesh", type=mesh_spec, help="tensor=N: tensor parallelism over N devices (default: one)")
    p.add_argument("--chunk-size", type=count(16), default=512, help="prompt tokens per prefill chunk (a power of two)")
    p.add_argument("--max-queue", type=count(1), default=256, help="waiting requests before 429")
    p.add_argument("--decode-steps", type=count(1), default=DECODE_STEPS,
                   help="decode steps per device call: tokens reach the host (stop strings, streaming, admission of "
                        "new requests) every this many steps")
    p.add_argument("--prefill-batch", type=count(1), default=PREFILL_BATCH,
                   help="waiting requests prefilled together (each group keeps a cache of that many rows)")
    p.add_argument("--request-timeout", type=real(0, low_open=True), default=600.0,
                   help="seconds before a request is given up (504)")
    p.add_argument("--tokenizer", help="tokenizer.json or 'byte' (default: the checkpoint's, else byte-level)")
    p.add_argument("--model-name", help="the model id the API reports (default: the checkpoint's folder name)")
    return p


def _check(args) -> None:
    for name in ("max_batch", "chunk_size", "max_queue", "decode_steps", "prefill_batch", "port"):
        value = getattr(args, name)
        if value < (0 if name == "port" else 1):
            raise SystemExit(f"m1jax serve: --{name.replace('_', '-')} must be >= {0 if name == 'port' else 1}, "
                             f"got {value}")
    if args.chunk_size & (args.chunk_size - 1) or args.chunk_size < 16:
        raise SystemExit(f"m1jax serve: --chunk-size must be a power of two >= 16, got {args.chunk_size}")
    if args.max_context is not None and (args.max_context < 16 or args.max_context % 16):
        raise SystemExit(f"m1jax serve: --max-context must be a multiple of 16, got {args.max_context}")
    if not os.path.isdir(args.checkpoint):
        raise SystemExit(f"m1jax serve: --checkpoint {args.checkpoint!r} is not a directory")


def build_server(args):
    """Load, warm up and return (Server, FastAPI app) for parsed arguments (also used by tests and benchmarks)."""
    import jax
    from m1jax.checkpoint.load import load_any
    from m1jax.tokenizer import checkpoint_tokenizer
    from m1jax.model import M1ForCausalLM
    from m1jax.serve.app import Server, build_app
    from m1jax.serve.batcher import Batcher
    from m1jax.serve.chat_template import template_of
    from m1jax.serve.metrics import Metrics

    config, params = load_any(args.checkpoint, dtype=args.dtype)
    mesh = None
    if args.mesh:
        from m1jax.model import param_logical_axes
        from m1jax.sharding import create_mesh, shard_params
        import math
        split = {k: v for k, v in args.mesh.items() if k != "tensor" and v > 1}
        if split:
            raise SystemExit(f"m1jax serve: --mesh {split} would split the batch, but a prefill group may be one "
                             "row; serve over tensor parallelism only, e.g. --mesh tensor=4")
        size = math.prod(args.mesh.values())
        if size > jax.device_count():
            raise SystemExit(f"m1jax serve: --mesh needs {size} devices, there are {jax.device_count()}")
        mesh = create_mesh(args.mesh, devices=jax.devices()[:size])
        params = shard_params(params, mesh, param_logical_axes(config))
    tokenizer = checkpoint_tokenizer(args.checkpoint, config.vocab_size, args.tokenizer)
    max_context = args.max_context or min(4096, config.max_position_embeddings // 16 * 16)
    if max_context > config.max_position_embeddings:
        raise SystemExit(f"m1jax serve: --max-context {max_context} exceeds the model's max_position_embeddings "
                         f"({config.max_position_embeddings})")
    metrics = Metrics()
    server_box = {}
    model = M1ForCausalLM(config) if mesh is None else M1ForCausalLM(config, mesh=mesh)  # MoE expert-parallel over it
    batcher = Batcher(model, params, lambda ids: server_box["server"].text(ids),
                      max_batch=args.max_batch, max_context=max_context, chunk_size=args.chunk_size,
                      max_queue=args.max_queue, decode_steps=args.decode_steps, prefill_batch=args.prefill_batch,
                      metrics=metrics, mesh=mesh)
    server = Server(batcher, tokenizer, model_name=args.model_name or os.path.basename(os.path.abspath(
        args.checkpoint)), template=template_of(args.checkpoint), request_timeout=args.request_timeout,
        metrics=metrics)
    server_box["server"] = server
    begin = time.perf_counter()
    batcher.warm_up(2 * args.chunk_size - 16)  # a prompt that runs every chunk length once
    log.info("compiled in %.1f s on %s", time.perf_counter() - begin, jax.devices()[0].device_kind)
    batcher.start_thread()
    server.ready = True
    return server, build_app(server)


def serve_main(args) -> int:
    import uvicorn
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _check(args)
    server, app = build_server(args)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=None,
                            lifespan="off")
    web = uvicorn.Server(config)

    @contextlib.contextmanager
    def _stopping():
        try:
            yield
        finally:
            server.ready = False
            server.batcher.stop(timeout=60)

    with _stopping():
        original_startup = web.startup

        async def startup(sockets=None):
            await original_startup(sockets=sockets)
            ports = [s.getsockname()[1] for srv in web.servers for s in srv.sockets]
            print(f"m1jax serve: ready on http://{args.host}:{ports[0] if ports else args.port}", flush=True)
        web.startup = startup
        # uvicorn drains on SIGTERM, then re-raises the signal under the handler it found: make that one a no-op,
        # so a drained server exits 0
        previous = signal.signal(signal.SIGTERM, lambda *_: log.info("SIGTERM: drained, exiting"))
        try:
            web.run()
        finally:
            signal.signal(signal.SIGTERM, previous)
    return 0
