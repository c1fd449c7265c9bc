"""Serving tests' shared pieces: one small random checkpoint (made once per session) and one live server on it.

The checkpoint is an HF-style directory: config.json + safetensors from m1jax.save_pretrained, a byte-level BPE
tokenizer.json trained here (M1's bos/eos names) with one extra token, TOOL_BLOCK, whose text is a whole
`<tool_calls>` block, so a request with logit_bias on it makes the random model "call a tool".
The server runs uvicorn in a thread on 127.0.0.1 and a free port; every request loop in the tests is bounded.
"""
import argparse
import json
import os
import threading
import time

import pytest

from m1jax import M1Config
from m1jax.config import m1_schedule
from m1jax.params import draw_params

# the live server's batching shapes (test_batcher's batchers use them too, so both share compiled steps): several
# decode calls per request, and prefill groups of 1, 2 and 4 rows
DECODE_STEPS, PREFILL_BATCH = 4, 4
TOOL_BLOCK = '<tool_calls>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_calls>'
BROKEN_BLOCK = '<tool_calls>\n{"name": "get_weather", "arguments": {"city": \n</tool_calls>'
SPECIALS = ("<beginning_of_sentence>", "<end_of_sentence>", "<begin_of_document>")


def small_config() -> M1Config:
    """2 layers (lightning, softmax), hidden 32, 4 experts top-2, vocab 512: compiles in seconds on a CPU."""
    return M1Config.from_preset("tiny", hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16, num_experts=4,
                                expert_size=32, layer_types=m1_schedule(2, period=2), rotary_dim=8)


def _write_tokenizer(directory: str) -> None:
    import tokenizers
    from m1jax.tokenizer import train_bpe
    texts = ["The weather in Paris is mild. What is the weather like today?", "Hello world, how are you?"] * 20
    path = os.path.join(directory, "tokenizer.json")
    train_bpe(texts, 300, path, special_tokens=SPECIALS)
    tok = tokenizers.Tokenizer.from_file(path)
    tok.add_tokens([TOOL_BLOCK, BROKEN_BLOCK])
    tok.save(path)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": SPECIALS[0], "eos_token": SPECIALS[1]}, f)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    from m1jax import save_pretrained
    directory = str(tmp_path_factory.mktemp("serve_ckpt"))
    config = small_config()
    save_pretrained(directory, config, draw_params(config, 0))
    _write_tokenizer(directory)
    return directory


def serve_args(checkpoint: str, **overrides) -> argparse.Namespace:
    args = dict(checkpoint=checkpoint, host="127.0.0.1", port=0, max_batch=8, max_context=1024, dtype=None,
                mesh=None, chunk_size=32, max_queue=64, decode_steps=DECODE_STEPS, prefill_batch=PREFILL_BATCH,
                request_timeout=60.0, tokenizer=None, model_name="tiny-m1")
    args.update(overrides)
    return argparse.Namespace(**args)


@pytest.fixture(scope="session")
def live(checkpoint):
    """(base_url, Server): uvicorn in a thread on 127.0.0.1."""
    import uvicorn
    from m1jax.serve.cli import build_server
    server, app = build_server(serve_args(checkpoint))
    web = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not web.started:
        if time.time() > deadline:
            raise RuntimeError("the test server did not start within 30 s")
        time.sleep(0.05)
    port = web.servers[0].sockets[0].getsockname()[1]  # port 0: the system picked a free one
    yield f"http://127.0.0.1:{port}", server
    web.should_exit = True
    thread.join(10)
    server.batcher.stop(timeout=10)
