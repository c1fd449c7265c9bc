"""`m1jax serve` as a process: it logs when ready, and SIGTERM lets the request in flight finish, then exits 0."""
import json
import os
import signal
import subprocess
import sys
import threading

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sigterm_drains_in_flight_requests(checkpoint):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "m1jax.cli", "serve", "--checkpoint", checkpoint, "--port", "0",
                             "--max-batch", "2", "--max-context", "128", "--chunk-size", "16"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()
    port = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "ready on http://127.0.0.1:" in line:  # the port the system picked
                port.append(int(line.rsplit(":", 1)[1]))
                ready.set()
    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(180), "".join(lines[-20:])
        port = port[0]
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json() == {"status": "ok"}
        events = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                          json={"prompt": "Hello", "max_tokens": 40, "temperature": 0, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    if not events:
                        proc.send_signal(signal.SIGTERM)  # mid-stream
                    events.append(line[6:])
        assert events[-1] == "[DONE]"
        finish = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
        assert finish[-1] in ("stop", "length") and r.status_code == 200
        assert proc.wait(60) == 0, "".join(lines[-20:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
